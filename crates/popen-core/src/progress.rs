//! The one progress-bar style every stage uses (stderr; hidden when it is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` items labelled `label` (e.g. the stage name); `set_prefix` can name the
/// current part (a split, a phase).
pub fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}
