# One wgmma wrapper per shape for kernels/flash_attn_sm90.cu (S = Q·Kᵀ from shared memory, O += P·V
# with P from registers); usage: python3 scripts/kernels/gen_wgmma.py, paste the output in the file.
# The accumulators are "+f" operands so the compiler keeps them in place from issue to wait.

def ss(n):
    r = n // 2
    regs = ",".join(f"%{i}" for i in range(r))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(r))
    print(f"// d[0..{r}) (+)= A·B, m64n{n}k16: A and B from shared memory (descriptors, both K-major).")
    print(f"__device__ __forceinline__ void wgmma_ss_n{n}(float* d, unsigned long long da, unsigned long long db, int acc) {{")
    print( '    asm volatile(')
    print( '        "{\\n.reg .pred p;\\nsetp.ne.b32 p, %' + str(r + 2) + ', 0;\\n"')
    print(f'        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{regs}}}, %{r}, %{r+1}, p, 1, 1, 0, 0;\\n}}\\n"')
    print(f'        : {outs}')
    print( '        : "l"(da), "l"(db), "r"(acc));')
    print("}")
    print()
def rs(n):
    r = n // 2
    regs = ",".join(f"%{i}" for i in range(r))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(r))
    print(f"// d[0..{r}) += A·B, m64n{n}k16: A (bf16 pairs) from registers, B from shared memory, MN-major.")
    print(f"__device__ __forceinline__ void wgmma_rs_n{n}(float* d, const unsigned* a, unsigned long long db) {{")
    print( '    asm volatile(')
    print( '        "{\\n.reg .pred p;\\nsetp.ne.b32 p, %' + str(r + 5) + ', 0;\\n"')
    print(f'        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{regs}}}, {{%{r},%{r+1},%{r+2},%{r+3}}}, %{r+4}, p, 1, 1, 1;\\n}}\\n"')
    print(f'        : {outs}')
    print( '        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));')
    print("}")
    print()
for n in (64, 128): ss(n)
for n in (64, 128): rs(n)
