//! Device time of work queued on the compute stream, from a pair of CUDA events: what benches
//! outside this crate time kernels with (a host clock would also count launch gaps and the
//! queue ahead of the work).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use super::{CudaBackend, driver_err};
use crate::Result;

/// Two events on one device's compute stream. Owns the events; reusable: every
/// [`start`](Self::start) begins a new interval.
#[derive(Debug)]
pub struct ComputeTimer {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<CudaStream>,
}

impl ComputeTimer {
    /// A timer for work queued through `be` (its compute stream).
    pub fn new(be: &CudaBackend) -> Result<Self> {
        let dev = be.device();
        let drv = driver_err("timer");
        let start = dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(&drv)?;
        let end = dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(&drv)?;
        Ok(Self { start, end, stream: dev.stream.clone() })
    }

    /// Marks the start: what is queued on the compute stream after this call is timed.
    pub fn start(&self) -> Result<()> {
        self.start.record(&self.stream).map_err(driver_err("timer start"))
    }

    /// Marks the end, waits on the host until the device has reached it, and returns the device
    /// time since the last [`start`](Self::start), in ms.
    pub fn stop_ms(&self) -> Result<f64> {
        let drv = driver_err("timer stop");
        self.end.record(&self.stream).map_err(&drv)?;
        Ok(f64::from(self.start.elapsed_ms(&self.end).map_err(&drv)?))
    }

    /// Waits on the host until everything queued on the compute stream so far has run.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("timer synchronize"))
    }
}
