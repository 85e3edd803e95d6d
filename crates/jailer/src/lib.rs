//! `vigil-jailer`: Firecracker's jailer for Vigil. It takes Firecracker's jailer
//! flags with their meaning, builds a chroot for one VMM process, puts that process
//! in a cgroup (v2), new mount (and, when asked, PID and network) namespaces and
//! resource limits, drops to an unprivileged user and execs the VMM.
//!
//! Everything given is checked before anything is created (`plan`); then the jail
//! is built on disk and the cgroup made (`jail`, `cgroup`), undone if a step fails;
//! then the process enters the jail and becomes the VMM (`process`).

mod cgroup;
mod jail;
mod limits;
mod plan;
mod process;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use plan::Plan;

pub use cgroup::mounted_v2_root;

const ABOUT: &str = "\
Run one VMM process jailed, with Firecracker's jailer flags: in a chroot of its own,
a new mount namespace, a cgroup, resource limits, as --uid/--gid. Run as root.";

const AFTER_HELP: &str = "\
What it does, in order (every value is checked first; a refused one creates nothing):
  1. closes every inherited file descriptor but 0, 1 and 2;
  2. joins --netns;
  3. creates <chroot-base-dir>/<exec file name>/<id>/root (the jail's /, mode 0700,
     owned by --uid/--gid) with /dev, /dev/net and /run inside, copies --exec-file to
     /<exec file name> there, and makes /dev/kvm, /dev/net/tun and /dev/userfaultfd
     (the last two where the host has them) with the host's device numbers, owned by
     --uid/--gid;
  4. with --cgroup: creates the cgroup <cgroup v2 root>/<parent-cgroup>/<id>, enables
     the controllers the files need on the way down, writes the files; sets the
     resource limits; moves itself into the cgroup;
  5. enters a new mount namespace and pivot_root()s into the jail;
  6. --daemonize: detaches (setsid, standard input and outputs to /dev/null);
  7. writes its process id (the VMM's) to /<exec file name>.pid in the jail;
  8. drops to --uid/--gid (no supplementary groups, no new privileges) and execs
     /<exec file name> with the arguments after --, an empty environment, argv[0]
     the exec file's name. An exec file named `firecracker` (Vigil as Firecracker)
     first gets Firecracker's --id, --start-time-us and --start-time-cpu-us.
If a step before 5 fails, what it created is removed again.

The jail's folder may exist already, holding what the operator put there for the VMM
(as Firecracker's jailer allows): kernels, disks. One that still holds an earlier
run's /<exec file name>, its .pid or /dev/kvm is refused (a jail serves one run), and
so is an existing cgroup of that id.

Paths the VMM is given (--api-sock, --kernel, disks) are inside the jail: the API
socket of `-- run --api-sock /run/api.sock` is
<chroot-base-dir>/<exec file name>/<id>/root/run/api.sock on the host. Put (hard
link or copy) kernels and disks into the jail before the VMM opens them: into
<chroot-base-dir>/<exec file name>/<id>/root before the jailer starts, for a VMM that
boots at once (`-- run --kernel /vmlinux`).

Clean-up, as with Firecracker's jailer, is the operator's once the VMM has ended:
  rm -r <chroot-base-dir>/<exec file name>/<id>
  rmdir <cgroup v2 root>/<parent-cgroup>/<id>     (with --cgroup)

Exit status: that of the VMM, which replaces the jailer (same process id); with
--new-pid-ns the jailer waits for the VMM and exits with its status (128+N when
signal N ended it); with --daemonize it exits 0 once the VMM is detached. 1 when a
value is refused or a step fails (the message names the flag, the value and the
step), 2 when the command line cannot be parsed.

Example:
  vigil-jailer --id vm-1 --exec-file /usr/bin/vigil --uid 1000 --gid 1000 \\
      --cgroup memory.max=268435456 --cgroup cpu.max='50000 100000' \\
      --resource-limit no-file=1024 -- run --api-sock /run/api.sock";

/// Firecracker's jailer flags, as given (checked by [`run`]).
#[derive(Parser, Debug)]
#[command(name = "vigil-jailer", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Args {
    /// The VM's id: letters, digits and '-', at most 64 characters. It names the
    /// jail folder and the cgroup.
    #[arg(long, value_name = "ID")]
    pub id: String,

    /// The VMM binary (statically linked: the jail holds no libraries). Its file
    /// name names the jail's folder and the default --parent-cgroup; an exec file
    /// named `firecracker` is Vigil as Firecracker.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,

    /// The user id the VMM runs as.
    #[arg(long, value_name = "UID")]
    pub uid: String,

    /// The group id the VMM runs as (its only group).
    #[arg(long, value_name = "GID")]
    pub gid: String,

    /// Where jails are built (created if missing).
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,

    /// Join this network namespace (such as /var/run/netns/NAME, from `ip netns
    /// add NAME`) before dropping privileges.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Detach the VMM: a new session, standard input and outputs on /dev/null; the
    /// jailer exits 0 once it is detached (its pid is in /<exec file name>.pid).
    #[arg(long)]
    pub daemonize: bool,

    /// Run the VMM as process 1 of a new PID namespace. The jailer stays, outside
    /// the namespace and unprivileged, forwards signals sent to it (SIGTERM,
    /// SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2), and exits with the VMM's
    /// status; the VMM is killed if the jailer dies.
    #[arg(long)]
    pub new_pid_ns: bool,

    /// Write VALUE to the cgroup's FILE, such as memory.max=268435456,
    /// cpu.max='50000 100000', pids.max=64, cpuset.cpus=1, io.max='8:0 wbps=1048576'.
    /// Repeatable. The cgroup is <cgroup v2 root>/<parent-cgroup>/<id>.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,

    /// The cgroup hierarchy: 2 (the unified hierarchy) is the only one supported.
    #[arg(long, value_name = "1|2", default_value = "2")]
    pub cgroup_version: String,

    /// The cgroup (a path under the cgroup v2 root) the VM's cgroup is made in
    /// [default: the exec file's name]. Without --cgroup, the process moves into
    /// this cgroup itself when it exists (and stays where it is when it does not).
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,

    /// Limit a resource of the VMM (soft and hard limit): fsize (bytes of a file it
    /// writes), no-file (one more than its highest file descriptor; default 2048),
    /// nproc (processes and threads of --uid, host-wide), as (bytes of address
    /// space), memlock (bytes locked in memory), core (bytes of a core dump; 0: none).
    /// VALUE is a number or `unlimited`. Repeatable.
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,

    /// Log level of the jailer's own messages (error, warn, info: each step,
    /// debug) [default: warn; VIGIL_LOG overrides it].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Arguments for the exec file, after `--`.
    #[arg(last = true, value_name = "VMM ARGS")]
    pub exec_args: Vec<OsString>,
}

/// What the jailer created on the host, removed again when a step fails before the
/// process enters the jail (what the operator put in the jail stays).
#[derive(Default)]
struct Made {
    /// Folders and files of the jail, in the order made.
    paths: Vec<PathBuf>,
    /// Cgroup folders, outermost first.
    cgroups: Vec<PathBuf>,
}

impl Made {
    fn undo(self) {
        for dir in self.cgroups.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!("cannot remove the cgroup {}: {e}", dir.display());
            }
        }
        for path in self.paths.iter().rev() {
            let is_dir = path.symlink_metadata().is_ok_and(|m| m.is_dir());
            let removed = match is_dir {
                true => std::fs::remove_dir(path),
                false => std::fs::remove_file(path),
            };
            if let Err(e) = removed {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Jails this process and execs the VMM. Returns only on failure, or in a process
/// that does not become the VMM (the exit status it should end with).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let start = process::Clocks::now();
    process::close_inherited_fds()?;
    let plan = Plan::new(args)?;
    if let Some(netns) = &plan.netns {
        process::join_netns(netns)?;
    }
    let mut made = Made::default();
    if let Err(e) = prepare(&plan, &mut made) {
        made.undo();
        return Err(e);
    }
    // /dev/null is not in the jail: opened before entering it.
    let dev_null = match plan.daemonize {
        true => Some(process::open_dev_null()?),
        false => None,
    };
    jail::enter(&plan.root())?;
    if let Some(dev_null) = dev_null {
        if let process::Forked::Parent(_) = process::daemonize(dev_null)? {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let vmm = process::Vmm::new(&plan, start);
    if plan.new_pid_ns {
        return process::run_in_new_pid_ns(&plan, vmm);
    }
    jail::write_pid_file(&plan.exec_name, std::process::id())?;
    process::drop_privileges(plan.uid, plan.gid)?;
    Err(vmm.exec())
}

/// Steps 3 and 4 of the help: the jail on disk, the cgroup, the limits.
fn prepare(plan: &Plan, made: &mut Made) -> anyhow::Result<()> {
    jail::build(plan, made)?;
    if let Some(cgroup) = &plan.cgroup {
        cgroup.create(made)?;
    }
    limits::apply(&plan.limits)?;
    if let Some(cgroup) = &plan.cgroup {
        cgroup.join()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn arguments_after_the_separator_go_to_the_vmm() {
        let args = Args::try_parse_from([
            "vigil-jailer",
            "--id",
            "a",
            "--exec-file",
            "/bin/x",
            "--uid",
            "1",
            "--gid",
            "2",
            "--cgroup",
            "pids.max=8",
            "--cgroup=cpu.max=50000 100000",
            "--",
            "run",
            "--id",
            "x",
        ])
        .unwrap();
        assert_eq!(args.cgroups, ["pids.max=8", "cpu.max=50000 100000"]);
        assert_eq!(args.exec_args, ["run", "--id", "x"]);
        assert_eq!(args.chroot_base_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(args.cgroup_version, "2");
    }
}
