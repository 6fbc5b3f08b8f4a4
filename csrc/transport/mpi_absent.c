/*
 * mpi_absent.c -- the MPI entry points of a build made without MPI.
 */
#include "transport/transport.h"

int ra_have_mpi(void) { return 0; }

ra_status ra_comm_create_mpi(const void *mpi_comm, ra_comm **comm) {
  (void)mpi_comm;
  *comm = NULL;
  return ra_fail(RA_ERR_UNSUPPORTED,
                 "ringattn was built without MPI: install an MPI implementation "
                 "(e.g. apt-get install libopenmpi-dev openmpi-bin) and reinstall ringattn");
}

void ra_comm_exiting(void) {}
