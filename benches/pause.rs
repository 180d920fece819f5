//! Pause latency of the lucos VMM on the bundled test kernel.
//!
//! For 1 and 2 vCPUs, with a user task busy on every vCPU, prints:
//! - pause: from the pause request until every vCPU is out of KVM_RUN;
//! - pause+resume: the whole round trip as the VMM does it in-process;
//! - socket pause+resume: the same round trip as a client of the control
//!   socket sees it (two JSON requests), which is what `lucos pause/resume` pays.
//!
//! `cargo bench --bench pause` (LUCOS_BENCH_ITERS overrides the 2000 samples).

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_core::control::{Client, ErrorCode, Request, Response, Service};
use vmm_core::devices::{SerialCapture, SerialSink};
use vmm_core::{Vm, VmConfig};

/// The part of the VM's control server these requests use: vmm-core's
/// transport (socket, framing, one thread per client) and the VM's pause.
struct PauseService(Arc<Vm>);

impl Service for PauseService {
    fn handle(&self, req: &Request) -> Response {
        let r = match req {
            Request::Pause => self.0.pause().map(|t| t.as_secs_f64() * 1e6),
            Request::Resume => self.0.resume().map(|()| 0.0),
            _ => return Response::err(ErrorCode::BadRequest, "not served here"),
        };
        match r {
            Ok(us) => Response::ok(us),
            Err(e) => Response::err(ErrorCode::Internal, e.to_string()),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 0.5), percentile(&v, 0.99), v[v.len() - 1])
}

fn main() {
    let iters: usize = std::env::var("LUCOS_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let flavor = vmm_core::vm::host_kvm_flavor();
    println!("lucos pause latency, {iters} samples each, host KVM: {flavor:?}, test kernel with a busy user task per vCPU");
    println!(
        "{:<6} {:<24} {:>12} {:>12} {:>12}",
        "vCPUs", "measure", "median µs", "p99 µs", "max µs"
    );
    for vcpus in [1u8, 2] {
        let serial = Arc::new(SerialCapture::default());
        let vm = Vm::create(VmConfig {
            kernel: env!("LUCOS_TESTKERNEL").into(),
            initrd: None,
            cmdline: "iters=0 report=0 work=500".into(),
            vcpus,
            mem_bytes: 64 << 20,
            serial: SerialSink::new(false, None, Some(serial.clone())),
        })
        .expect("create VM");
        vm.start().expect("start");
        assert!(
            serial.wait_for("starting", Duration::from_secs(30)),
            "test kernel did not start:\n{}",
            serial.text()
        );
        let vm = Arc::new(vm);

        let (mut pause, mut round) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for _ in 0..iters {
            let t0 = Instant::now();
            let took = vm.pause().expect("pause");
            vm.resume().expect("resume");
            round.push(t0.elapsed().as_secs_f64() * 1e6);
            pause.push(took.as_secs_f64() * 1e6);
            std::thread::sleep(Duration::from_micros(200));
        }

        let dir = std::env::temp_dir().join(format!("lucos-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("bench.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind");
        let service = Arc::new(PauseService(vm.clone()));
        let gate = Arc::new(vmm_core::control::AcceptGate::new().expect("eventfd"));
        std::thread::spawn(move || vmm_core::control::serve(listener, service, gate));
        let mut client = Client::connect("bench", &sock).expect("connect");
        let mut socket = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            client.call(&Request::Pause).expect("pause");
            client.call(&Request::Resume).expect("resume");
            socket.push(t0.elapsed().as_secs_f64() * 1e6);
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = std::fs::remove_dir_all(&dir);

        for (name, v) in [
            ("pause (all vCPUs out)", pause),
            ("pause+resume", round),
            ("socket pause+resume", socket),
        ] {
            let (med, p99, max) = summary(v);
            println!("{vcpus:<6} {name:<24} {med:>12.1} {p99:>12.1} {max:>12.1}");
        }
        assert!(
            !serial.text().contains("PANIC"),
            "guest crashed:\n{}",
            serial.text()
        );
        vm.stop();
    }
}
