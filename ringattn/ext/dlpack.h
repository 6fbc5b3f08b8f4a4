/*
 * dlpack.h -- the DLPack ABI as ringattn uses it, written from the published
 * struct layouts (DLPack v0.8 for the legacy DLManagedTensor, v1.x for
 * DLManagedTensorVersioned).  Only what the extension reads or writes is
 * declared; the layouts must match the specification byte for byte.
 */
#ifndef RINGATTN_EXT_DLPACK_H
#define RINGATTN_EXT_DLPACK_H

#include <stdint.h>

/* DLDeviceType values that ringattn names. */
enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLCUDAManaged = 13
};

/* DLDataTypeCode values. */
enum {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLOpaqueHandle = 3,
  kDLBfloat = 4,
  kDLComplex = 5,
  kDLBool = 6
};

typedef struct {
  int32_t device_type; /* a DLDeviceType */
  int32_t device_id;
} DLDevice;

typedef struct {
  uint8_t code; /* a DLDataTypeCode */
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void *data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;
  int64_t *strides; /* in elements; NULL means compact row-major */
  uint64_t byte_offset;
} DLTensor;

/* v0.8: capsule name "dltensor", "used_dltensor" once consumed. */
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

#define DLPACK_FLAG_BITMASK_READ_ONLY ((uint64_t)1 << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED ((uint64_t)1 << 1)

/* v1.x: capsule name "dltensor_versioned", "used_dltensor_versioned" once
 * consumed.  The version comes first so that a consumer can check it before
 * reading anything else. */
typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned *self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

#endif /* RINGATTN_EXT_DLPACK_H */
