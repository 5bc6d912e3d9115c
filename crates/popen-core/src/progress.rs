//! The one progress-bar style every stage uses (stderr). On a terminal it redraws in place;
//! otherwise (a batch job's log file, a pipe) it writes the same line as plain text every
//! [`LOG_EVERY_SECS`] seconds (`POPEN_PROGRESS_SECS` overrides) and when it completes, so an
//! array task's log shows progress, rate and ETA during its run, without escape codes.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Seconds between two progress lines when stderr is not a terminal.
pub const LOG_EVERY_SECS: u64 = 30;

/// Whether stderr is a terminal (bars redraw in place, log lines may be coloured).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar over `len` items labelled `label` (e.g. the stage name); `set_prefix` can name the
/// current part (a split, a phase).
pub fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = if interactive() {
        ProgressBar::new(len)
    } else {
        let every = std::env::var("POPEN_PROGRESS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(LOG_EVERY_SECS);
        ProgressBar::with_draw_target(
            Some(len),
            ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new(every, len)), 1),
        )
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// The draw target of a bar without a terminal: its lines, at most one per `every` seconds
/// (the first at once, the completed one always), on stderr.
#[derive(Debug)]
struct LogLines {
    every: Duration,
    done: String,
    last: Mutex<(Option<Instant>, String)>,
}

impl LogLines {
    fn new(every_secs: u64, len: u64) -> LogLines {
        LogLines {
            every: Duration::from_secs(every_secs),
            done: format!(" {len}/{len} "),
            last: Mutex::new((None, String::new())),
        }
    }

    fn emit(&self, line: &str) -> std::io::Result<()> {
        let line = line.trim_end();
        if line.trim().is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = last.0.is_none_or(|t| now.duration_since(t) >= self.every);
        let finished = line.contains(&self.done) && last.1 != line;
        if due || finished {
            eprintln!("{line}");
            *last = (Some(now), line.to_string());
        }
        Ok(())
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_throttled_but_the_last_is_kept() {
        let l = LogLines::new(3600, 5);
        // Only the throttling state is observable: the first line passes, the next does not,
        // the completed one does.
        l.emit("x [==] 1/5 eta 1s").unwrap();
        let first = l.last.lock().unwrap().1.clone();
        l.emit("x [===] 2/5 eta 1s").unwrap();
        assert_eq!(l.last.lock().unwrap().1, first);
        l.emit("x [=====] 5/5 eta 0s").unwrap();
        assert_eq!(l.last.lock().unwrap().1, "x [=====] 5/5 eta 0s");
    }
}
