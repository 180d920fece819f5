//! Port-I/O devices: COM1 (16550, vm-superio), the i8042 reset line, the
//! debug-exit port, and the bus that routes a vCPU's port exits to them.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Debug-exit port: a write of byte `v` ends the VM with guest status `v`.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// i8042 command port: writing 0xfe pulses the CPU reset line.
pub const I8042_CMD_PORT: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
const I8042_RESET_CMD: u8 = 0xfe;

/// Raises COM1's interrupt through a KVM irqfd.
#[derive(Debug)]
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Everything the guest printed on its serial port, for tests and the demo.
#[derive(Debug, Default)]
pub struct SerialCapture {
    buf: Mutex<Vec<u8>>,
    grew: Condvar,
}

impl SerialCapture {
    /// The output so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the output contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits until `needle` occurs at least `count` times (true) or `timeout`
    /// passes (false).
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = self.lock();
        loop {
            if String::from_utf8_lossy(&buf).matches(needle).count() >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            buf = self
                .grew
                .wait_timeout(buf, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn push(&self, data: &[u8]) {
        self.lock().extend_from_slice(data);
        self.grew.notify_all();
    }
}

/// Where serial output goes: any of stdout, a log file, an in-memory capture.
#[derive(Debug, Default)]
pub struct SerialSink {
    stdout: bool,
    log: Option<File>,
    capture: Option<Arc<SerialCapture>>,
    line: Vec<u8>,
}

impl SerialSink {
    /// A sink writing to the given destinations.
    pub fn new(stdout: bool, log: Option<File>, capture: Option<Arc<SerialCapture>>) -> Self {
        Self {
            stdout,
            log,
            capture,
            line: Vec::with_capacity(256),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.stdout {
            let mut out = io::stdout().lock();
            out.write_all(&self.line)?;
            out.flush()?;
        }
        if let Some(log) = self.log.as_mut() {
            log.write_all(&self.line)?;
        }
        if let Some(c) = &self.capture {
            c.push(&self.line);
        }
        self.line.clear();
        Ok(())
    }
}

impl Write for SerialSink {
    // Output is passed on a line at a time, so lines from the guest reach
    // stdout, the log and the capture whole.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.emit()?;
            }
        }
        Ok(buf.len())
    }

    // vm-superio flushes after every byte; lines are passed on whole, so a
    // flush does nothing here. A partial last line goes out with `drain`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SerialSink {
    /// Passes on a partial last line (when the VM ends).
    pub fn drain(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        self.emit()
    }
}

/// What the guest asked for through a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// Wrote `status` to the debug-exit port.
    Exit(u8),
    /// Pulsed the reset line through the i8042.
    Reset,
    /// Entered ACPI S5 (soft off) through the sleep control register.
    PowerOff,
}

impl SerialSink {
    /// The partial last line, not yet passed on.
    pub fn pending(&self) -> &[u8] {
        &self.line
    }

    /// Drops the partial last line (another VMM process passes it on now).
    pub fn forget_pending(&mut self) {
        self.line.clear();
    }
}

/// COM1's registers and buffered input, as saved for another VMM process
/// (vm-superio's `SerialState`, which is not serializable itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegs {
    /// Divisor latch, low and high byte.
    pub divisor: [u8; 2],
    /// Interrupt enable.
    pub ier: u8,
    /// Interrupt identification.
    pub iir: u8,
    /// Line control.
    pub lcr: u8,
    /// Line status.
    pub lsr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Modem status.
    pub msr: u8,
    /// Scratch.
    pub scr: u8,
    /// Bytes received and not yet read by the guest.
    pub input: Vec<u8>,
    /// Output of the guest's partial last line, not yet passed on.
    pub pending_output: Vec<u8>,
}

/// The port-I/O bus.
#[derive(Debug)]
pub struct PioBus {
    serial: Mutex<Serial<IrqfdTrigger, vm_superio::serial::NoEvents, SerialSink>>,
}

impl PioBus {
    /// A bus with COM1 raising its interrupt through `irq`.
    pub fn new(irq: EventFd, sink: SerialSink) -> Self {
        Self {
            serial: Mutex::new(Serial::new(IrqfdTrigger(irq), sink)),
        }
    }

    fn serial(
        &self,
    ) -> std::sync::MutexGuard<'_, Serial<IrqfdTrigger, vm_superio::serial::NoEvents, SerialSink>>
    {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles a guest IN: fills `data`. Unclaimed ports read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                data[0] = self.serial().read((port - COM1_BASE) as u8);
            }
            // i8042 status: output buffer empty, input buffer empty.
            I8042_CMD_PORT => data.fill(0),
            I8042_DATA_PORT => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Handles a guest OUT. Returns what the guest asked of the VMM, if anything.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                if let Err(e) = self.serial().write((port - COM1_BASE) as u8, data[0]) {
                    log::warn!("serial write failed: {e:?}");
                }
                None
            }
            DEBUG_EXIT_PORT => data.first().map(|&v| GuestRequest::Exit(v)),
            // ACPI sleep control: SLP_EN (bit 5) with SLP_TYP (bits 2-4) of S5.
            crate::arch::acpi::SLEEP_CONTROL_PORT => match data.first() {
                Some(&v) if v & 0x20 != 0 && (v >> 2) & 7 == crate::arch::acpi::S5_SLEEP_TYPE => {
                    Some(GuestRequest::PowerOff)
                }
                _ => None,
            },
            I8042_CMD_PORT if data.first() == Some(&I8042_RESET_CMD) => Some(GuestRequest::Reset),
            _ => None,
        }
    }

    /// COM1's state (the other devices have none).
    pub fn serial_regs(&self) -> SerialRegs {
        let serial = self.serial();
        let st = serial.state();
        SerialRegs {
            divisor: [st.baud_divisor_low, st.baud_divisor_high],
            ier: st.interrupt_enable,
            iir: st.interrupt_identification,
            lcr: st.line_control,
            lsr: st.line_status,
            mcr: st.modem_control,
            msr: st.modem_status,
            scr: st.scratch,
            input: st.in_buffer,
            pending_output: serial.writer().pending().to_vec(),
        }
    }

    /// Puts COM1 in state `r`, raising its interrupt through `irq`.
    pub fn restore_serial(&self, r: &SerialRegs, irq: EventFd) -> io::Result<()> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r.divisor[0],
            baud_divisor_high: r.divisor[1],
            interrupt_enable: r.ier,
            interrupt_identification: r.iir,
            line_control: r.lcr,
            line_status: r.lsr,
            modem_control: r.mcr,
            modem_status: r.msr,
            scratch: r.scr,
            in_buffer: r.input.clone(),
        };
        let mut serial = self.serial();
        let spare = IrqfdTrigger(irq.try_clone()?);
        let old = std::mem::replace(&mut *serial, Serial::new(spare, SerialSink::default()));
        let mut sink = old.into_writer();
        sink.line.clear();
        sink.line.extend_from_slice(&r.pending_output);
        let restored = Serial::from_state(
            &state,
            IrqfdTrigger(irq),
            vm_superio::serial::NoEvents,
            sink,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
        *serial = restored;
        Ok(())
    }

    /// Drops COM1's partial output line: the VMM process that takes the
    /// guest over passes it on.
    pub fn forget_pending_output(&self) {
        self.serial().writer_mut().forget_pending();
    }

    /// Flushes any partial line of serial output.
    pub fn flush(&self) {
        if let Err(e) = self.serial().writer_mut().drain() {
            log::warn!("serial flush failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (PioBus, Arc<SerialCapture>) {
        let cap = Arc::new(SerialCapture::default());
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        (
            PioBus::new(irq, SerialSink::new(false, None, Some(cap.clone()))),
            cap,
        )
    }

    #[test]
    fn serial_bytes_reach_the_capture_by_line() {
        let (bus, cap) = bus();
        for b in b"hello\nwor" {
            assert_eq!(bus.pio_write(COM1_BASE, &[*b]), None);
        }
        assert_eq!(cap.text(), "hello\n");
        bus.flush();
        assert_eq!(cap.text(), "hello\nwor");
        assert!(cap.wait_for("wor", Duration::from_millis(1)));
        assert!(!cap.wait_for("absent", Duration::from_millis(1)));
    }

    #[test]
    fn exit_and_reset_ports() {
        let (bus, _) = bus();
        assert_eq!(
            bus.pio_write(DEBUG_EXIT_PORT, &[3]),
            Some(GuestRequest::Exit(3))
        );
        assert_eq!(
            bus.pio_write(I8042_CMD_PORT, &[0xfe]),
            Some(GuestRequest::Reset)
        );
        assert_eq!(bus.pio_write(I8042_CMD_PORT, &[0xd1]), None);
        assert_eq!(bus.pio_write(0x3c0, &[0x34]), Some(GuestRequest::PowerOff));
        assert_eq!(bus.pio_write(0x3c0, &[0x14]), None); // S5 type without SLP_EN
        let mut b = [0u8; 1];
        bus.pio_read(0x1234, &mut b);
        assert_eq!(b[0], 0xff);
        // LSR: transmitter empty.
        bus.pio_read(COM1_BASE + 5, &mut b);
        assert_ne!(b[0] & 0x20, 0);
    }
}
