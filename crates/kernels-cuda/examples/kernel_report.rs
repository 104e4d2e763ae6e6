//! Registers, shared memory, stack and spills of every kernel variant, from ptxas (through
//! NVRTC; no GPU needed): `kernel_report [arch] [filter]`, e.g. `kernel_report sm_90 int8`.
//! With `KVSERVE_CUBIN_DIR` set, each variant's cubin is also written there (for
//! `cuobjdump -sass`), named after the variant.
#![allow(clippy::print_stdout)]

use kernels_cuda::compile::{Variant, compile_fresh, resource_summary};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    let filter = args.next().unwrap_or_default();
    for v in Variant::all() {
        let name = v.to_string();
        if !name.contains(&filter) {
            continue;
        }
        let c = compile_fresh(&v, &arch)?;
        if let Some(dir) = std::env::var_os("KVSERVE_CUBIN_DIR") {
            let file: String = format!("{arch} {name}")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            std::fs::create_dir_all(&dir)?;
            std::fs::write(std::path::Path::new(&dir).join(file + ".cubin"), &c.cubin)?;
        }
        for line in resource_summary(&c.log) {
            println!("{arch} {name} {line}");
        }
    }
    Ok(())
}
