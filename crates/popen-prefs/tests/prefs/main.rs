//! popen-prefs: one test binary (modules per part).
mod diff;
mod noise;
mod select;
mod corrector;
mod collect;
mod openai;
mod failures;
