//! The git commit `popen --version` prints (`unknown` outside a git checkout).
fn main() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=POPEN_GIT_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        // Only paths that exist: cargo reruns a build script at every build while a path it
        // watches is missing, and that rerun relinked `popen` at every `make` stage (1-2 min
        // each in release). The branch's ref lives in its own file or in packed-refs (or both).
        let head = git(&["symbolic-ref", "-q", "HEAD"]);
        for path in head.iter().map(|h| format!("{dir}/{h}")).chain([format!("{dir}/packed-refs")]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
