//! Segmentation preference maths that the preference builder (collect-ps) and the trainer
//! (dpo's phase-1 indicator) both use: the noise-filling recipes and Eq. 1 / boundary-IoU
//! scoring with Algorithm 1's curriculum selection. Here so that neither depends on the other.

pub mod noise;
pub mod select;
