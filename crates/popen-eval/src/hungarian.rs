//! The rectangular linear sum assignment problem, SciPy's algorithm and tie-breaking: moved
//! to [`popen_core::assign`] (the ensemble loss pairs `<seg>` groups with targets by it too,
//! SPEC 10.17) and re-exported here; its errors are `popen_core::CoreError`s (`EvalError`
//! converts them).

pub use popen_core::assign::linear_sum_assignment;
