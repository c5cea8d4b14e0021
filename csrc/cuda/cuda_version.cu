#include <cuda_runtime_api.h>

int dynkernels_cuda_version() { return CUDART_VERSION; }
