//! Decode a photo with popen's decoder (the `image` crate) and write the RGB pixels as a
//! lossless PNG, so that `tools/reference/mobile_sam_fixture.py --pixels` feeds the official
//! MobileSAM exactly the pixels popen sees (JPEG decoders differ by a level or two).
//!
//! `cargo run -p popen-sam --example decode_photo -- in.jpg out.png`

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (src, dst) = (&args[1], &args[2]);
    let bytes = std::fs::read(src).expect("readable photo");
    let img = popen_core::imageio::decode_rgb(&bytes, Some(src)).expect("decodable photo");
    std::fs::write(dst, popen_core::imageio::encode_png(&img).expect("png")).expect("writable output");
}
