//! Errors of the residency layer: streaming and expert-cache failures, and the ops, I/O and
//! catalog errors under them.

#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error(transparent)]
    Weights(#[from] ollm_weights::WeightsError),

    #[error(transparent)]
    Ops(#[from] ollm_ops::OpsError),

    #[error(transparent)]
    Io(#[from] ollm_io::IoError),

    #[error("measuring disk reads on {path}: {source}")]
    DiskMeasure { path: std::path::PathBuf, source: ollm_io::IoError },

    #[error("weight streaming: {0}")]
    Stream(String),
}

pub type Result<T> = std::result::Result<T, ResidencyError>;
