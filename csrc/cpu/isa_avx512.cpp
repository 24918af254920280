// AVX-512 instance of the kernel (kernel_impl.h), chosen at run time when the CPU has it.
// Only plain C headers come before the target pragma, so no shared inline code is compiled
// with AVX-512 instructions (see isa_kernel.h).
#include <cstdint>

#include "isa_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#define HCS_W 16
#define HCS_QK_MR 6
#define HCS_QK_NV 4
#define HCS_PV_MR 6
#define HCS_PV_NV 4
#define HCS_KERNEL_FN kernel_avx512
#define HCS_ISA_NAME "avx512"
#include "kernel_impl.h"
#pragma GCC pop_options
#else
namespace hcs_cpu {
const IsaKernel* kernel_avx512() { return nullptr; }
}  // namespace hcs_cpu
#endif
