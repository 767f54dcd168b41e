//! Compiles common/kernels/*.cu to PTX with nvcc, only when the `cuda` feature is on, so
//! CPU builds and CI need no CUDA toolkit. The PTX is embedded by `kernels.rs`
//! (`include_str!`) and JIT-compiled by the driver when first loaded.
//!
//! nvcc is taken from $NVCC, else $CUDA_ROOT/bin/nvcc (what ../shared/cuda/build.sh
//! sets), else PATH. The target architecture is $CUDA_COMPUTE_CAP (default 90, Hopper).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc_path();
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("common/kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    kernels.sort();
    for src in kernels {
        let stem = src.file_stem().expect("a .cu file has a stem").to_string_lossy().into_owned();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}; set NVCC or CUDA_ROOT", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
