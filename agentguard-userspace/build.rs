//! Build the kernel programs (agentguard-ebpf) with the nightly toolchain and
//! bpf-linker, through aya-build; the object lands in OUT_DIR and is embedded
//! into the binary.
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agentguard-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agentguard-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
