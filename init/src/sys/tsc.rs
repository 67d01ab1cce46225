//! The CPU's time-stamp counter next to the boot clock, for `kairos-agent analyze time`'s
//! firmware+loader figure. Nothing records when the machine was switched on, but on x86 the
//! TSC counts from 0 at power-on or reset (QEMU's too): two samples of (TSC, CLOCK_BOOTTIME)
//! give the TSC's rate, and the first sample's TSC over that rate, less its boot-clock time,
//! is how long firmware and loader took before the kernel's t=0. The samples are recorded
//! raw in the timeline; the agent does the arithmetic and says "not known" when it makes no
//! sense (a TSC reset by the kernel, a hypervisor offsetting it).

/// One reading: the TSC and CLOCK_BOOTTIME in milliseconds, taken back to back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub tsc: u64,
    pub boottime_ms: f64,
}

/// A sample now; None where there is no TSC to read (not x86_64).
pub fn sample() -> Option<Sample> {
    let tsc = read()?;
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Some(Sample {
        tsc,
        boottime_ms: ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6,
    })
}

#[cfg(target_arch = "x86_64")]
fn read() -> Option<u64> {
    // SAFETY: RDTSC reads a counter and has no memory effects; every x86_64 CPU has it (the
    // kernel only traps it with PR_SET_TSC, which nothing in the initramfs sets).
    Some(unsafe { core::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
fn read() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn counter_and_clock_advance() {
        let a = super::sample().expect("x86_64 has a TSC");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = super::sample().expect("x86_64 has a TSC");
        assert!(b.tsc > a.tsc);
        assert!(b.boottime_ms >= a.boottime_ms + 5.0);
    }
}
