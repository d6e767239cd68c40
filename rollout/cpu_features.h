/* Which SIMD level the rollout kernels may use: CPUID + XGETBV, decided once at start-up.
 *
 * The environment variable QUILLAN_ISA=ref|avx2|avx512 lowers the level (tests and the bench
 * use it to exercise the portable and AVX2 paths on an AVX-512 machine); it can never raise it
 * above what the CPU and the OS support. */
#ifndef QUILLAN_CPU_FEATURES_H
#define QUILLAN_CPU_FEATURES_H

#include "error.h"

typedef enum {
    CPU_ISA_REF = 0, /* portable C, any CPU */
    CPU_ISA_AVX2,    /* AVX2 + FMA + F16C + POPCNT, OS saves YMM state */
    CPU_ISA_AVX512,  /* AVX-512 F/BW/VL/DQ/VNNI on top of AVX2, OS saves ZMM state */
    CPU_ISA_COUNT
} cpu_isa_t;

#define CPU_ISA_ENV "QUILLAN_ISA"

/* Highest level this CPU and OS support (CPU_ISA_REF on non-x86 machines). */
cpu_isa_t cpu_isa_detect(void);

/* "ref", "avx2", "avx512"; "?" when out of range. */
const char *cpu_isa_name(cpu_isa_t isa);

/* Parses a level name; -1 with err naming the value and the choices when unknown. */
int cpu_isa_parse(const char *name, cpu_isa_t *isa, qerr_t *err);

/* The level to use: cpu_isa_detect(), or QUILLAN_ISA when set. Returns -1 with err when
 * QUILLAN_ISA is not a level name or asks for a level the machine lacks. */
int cpu_isa_select(cpu_isa_t *isa, qerr_t *err);

#endif
