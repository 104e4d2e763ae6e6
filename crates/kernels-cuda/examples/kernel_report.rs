//! Registers, shared memory, stack and spills of every kernel variant, from ptxas (through
//! NVRTC; no GPU needed): `kernel_report [arch] [filter] [cubin_dir]`, e.g. `kernel_report sm_90
//! int8`. With `cubin_dir`, each variant's cubin is also written there as `<name>.<arch>.cubin`
//! (for nvdisasm: SASS instruction counts, before/after comparisons).
#![allow(clippy::print_stdout)]

use kernels_cuda::compile::{Variant, compile_fresh, resource_summary};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    let filter = args.next().unwrap_or_default();
    let cubin_dir = args.next().map(std::path::PathBuf::from);
    if let Some(dir) = &cubin_dir {
        std::fs::create_dir_all(dir)?;
    }
    for v in Variant::all() {
        let name = v.to_string();
        if !name.contains(&filter) {
            continue;
        }
        let c = compile_fresh(&v, &arch)?;
        if let Some(dir) = &cubin_dir {
            std::fs::write(dir.join(format!("{name}.{arch}.cubin")), &c.cubin)?;
        }
        for line in resource_summary(&c.log) {
            println!("{arch} {name} {line}");
        }
    }
    Ok(())
}
