/*
 * nccl_absent.c -- the NCCL entry points of a build made without CUDA/NCCL.
 */
#include "transport/transport.h"

#define NO_NCCL "ringattn was built without CUDA and NCCL (rebuild on a machine with nvcc and nccl.h)"

int ra_have_nccl(void) { return 0; }

ra_status ra_nccl_unique_id(unsigned char id[RA_NCCL_UNIQUE_ID_BYTES]) {
  (void)id;
  return ra_fail(RA_ERR_UNSUPPORTED, NO_NCCL);
}

ra_status ra_comm_create_nccl(const unsigned char id[RA_NCCL_UNIQUE_ID_BYTES], int world_size, int rank,
                              int device, double timeout, ra_comm **comm) {
  (void)id; (void)world_size; (void)rank; (void)device; (void)timeout;
  *comm = NULL;
  return ra_fail(RA_ERR_UNSUPPORTED, NO_NCCL);
}

ra_status ra_comm_create_nccl_from_mpi(const void *mpi_comm, int device, double timeout, ra_comm **comm) {
  (void)mpi_comm; (void)device; (void)timeout;
  *comm = NULL;
  return ra_fail(RA_ERR_UNSUPPORTED, NO_NCCL);
}
