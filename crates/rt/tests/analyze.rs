//! Whole documents through the analysis: interfaces, flags, API bodies, placement,
//! and the explanations of a "no".

use vigil_rt::analyze_text;

#[test]
fn example_is_schedulable_with_flags_and_bodies() {
    let text = include_str!("../examples/two-vms.toml");
    let report = analyze_text(text, Some("two-vms.toml")).unwrap();
    println!("{}", report.text());
    assert!(report.schedulable, "{:?}", report.problems);
    let ctl = &report.vms[0];
    let i = ctl.interface.as_ref().unwrap();
    assert_eq!(i.vcpus, 1);
    assert!(i.bandwidth > ctl.utilization && i.bandwidth < 1.0);
    assert_eq!(ctl.flags.len(), 1);
    assert!(ctl.flags[0].starts_with("--vcpu-sched vcpu=0,policy=deadline,runtime="));
    let body = serde_json::to_value(&ctl.vcpu_sched[0]).unwrap();
    assert_eq!(body["policy"], "deadline");
    assert_eq!(body["deadline_ns"], body["period_ns"]);
    assert_eq!(body.as_object().unwrap().len(), 5);
    // 1.175 of a CPU: two vCPUs, under global EDF on an MPR.
    let video = &report.vms[1];
    let i = video.interface.as_ref().unwrap();
    assert_eq!(i.vcpus, 2);
    assert_eq!(video.vcpu_sched.len(), 2);
    let total: u64 = video.vcpu_sched.iter().map(|s| s.runtime_ns).sum();
    assert_eq!(total, i.budget_ns);
    assert!(video.cores.iter().all(Option::is_some));
}

#[test]
fn a_no_names_the_vm_task_interval_and_numbers() {
    let text = r#"
[host]
cores = 2
[[vms]]
name = "ctl"
scheduler = "fp"
period = "10ms"
tasks = [{ name = "sensor", period = "10ms", wcet = "6ms" },
         { name = "log", period = "20ms", wcet = "9ms" }]
"#;
    let report = analyze_text(text, None).unwrap();
    assert!(!report.schedulable);
    assert_eq!(
        report.problems,
        ["vm \"ctl\" task \"log\": at t=20ms demand 21ms > supply 20ms with Θ=10ms Π=10ms (the whole of one vCPU); \
          fixed priorities are analysed on one vCPU only: use edf for more"]
    );
}

#[test]
fn a_vcpu_that_fits_no_core_is_named_with_the_loads() {
    // 0.95 of a CPU in tasks: at Π = 10ms the vCPU needs 0.967, over the limit.
    let text = r#"
[host]
cores = 1
[[vms]]
name = "ctl"
scheduler = "fp"
period = "10ms"
tasks = [{ name = "sensor", period = "10ms", wcet = "6ms" },
         { name = "log", period = "20ms", wcet = "7ms" }]
"#;
    let report = analyze_text(text, None).unwrap();
    assert!(!report.schedulable);
    assert_eq!(
        report.problems,
        [
            "vm \"ctl\" vCPU 0 (runtime 9.667ms per 10ms, 0.967 of a core) fits no core: core 0 0.000 of 0.950 each",
            "the vCPUs need 0.967 CPUs of SCHED_DEADLINE bandwidth; the host admits 0.950 (1 cores × 0.95)"
        ]
    );
    assert_eq!(report.vms[0].cores, [None]);
}
