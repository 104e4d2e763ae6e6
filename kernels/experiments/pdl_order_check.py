# Not part of the build: what the GEMV kernels do before their PDL wait, from the SASS
# (2026-12-02). A kernel launched dependent may only read weights before griddepcontrol.wait
# (ACQBULK in the SASS); the *_snorm_M entries issue their first weight loads there on
# purpose, and the compiler once hoisted their __ldg of the residual (ld.global.nc of
# `const __restrict__` data) above the wait, which C++ alone does not forbid. This compiles
# kernels/gemv.cu with NVRTC, disassembles it and lists, per entry, the memory instructions
# before the wait; only evict-first weight loads (LDG.E.EF.*, load_stream) are allowed.
#
#   LD_LIBRARY_PATH=$N/lib python3 kernels/experiments/pdl_order_check.py sm_90 [include dir]
#
# with $N an NVRTC install (e.g. the nvidia-cuda-nvrtc wheel's nvidia/cu13) and nvdisasm on
# PATH or in $NVDISASM (pip install nvidia-cuda-nvdisasm). Exit status 1 on a violation.
import ctypes
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.dirname(HERE)


def compile_cubin(arch, include, scalar):
    lib = ctypes.CDLL("libnvrtc.so.13")
    src = open(os.path.join(KERNELS, "gemv.cu")).read()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"gemv.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"-DSCALAR={scalar}", f"--gpu-architecture={arch}", "--std=c++17",
            "-default-device", f"--include-path={KERNELS}"]
    if include:
        opts.append(f"--include-path={include}")
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    if lib.nvrtcCompileProgram(prog, len(opts), arr):
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    size = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw


def before_wait(sass):
    """{entry: (wait found, [memory instructions before it])}."""
    out, entry = {}, None
    for line in sass.splitlines():
        m = re.match(r"^(gemv\w*):$", line.strip())
        if m:
            entry = m.group(1)
            out[entry] = (False, [])
            continue
        ins = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if entry is None or not ins or out[entry][0]:
            continue
        op = re.sub(r"^@!?U?P\w+\s+", "", ins.group(1)).split()[0]
        if op == "ACQBULK":
            out[entry] = (True, out[entry][1])
        elif re.match(r"(LDG|LDGSTS|LD|LDS|STS|STG|ST|ATOM|RED|BAR)\b", op):
            out[entry][1].append(op)
    return out


def main():
    arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
    include = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("KVSERVE_CUDA_INCLUDE")
    nvdisasm = os.environ.get("NVDISASM", "nvdisasm")
    bad = 0
    for scalar in (0, 1):
        path = f"/tmp/pdl_order_check_{scalar}.cubin"
        with open(path, "wb") as f:
            f.write(compile_cubin(arch, include, scalar))
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True,
                              check=True).stdout
        for entry, (waits, ops) in sorted(before_wait(sass).items()):
            wrong = [op for op in ops if not op.startswith("LDG.E.EF")]
            if wrong or (not waits and arch >= "sm_90"):
                bad += 1
                print(f"SCALAR={scalar} {entry}: before the wait {wrong}, wait found {waits}")
            elif ops:
                print(f"SCALAR={scalar} {entry}: {len(ops)} weight loads before the wait")
    print("violations:", bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
