//! popen-prefs: one test binary (modules per part).
mod collect;
mod corrector;
mod diff;
mod failures;
mod noise;
mod openai;
mod select;
