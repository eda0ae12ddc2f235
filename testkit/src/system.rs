//! What the kernel says about the machine itself.

/// Clock ticks per second (USER_HZ): the unit of the CPU times in
/// /proc/stat and /proc/PID/stat.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
