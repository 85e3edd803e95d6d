//! System call tracing, the library part: a hit at a system call entry decoded
//! from the vCPU's registers (and the caller's stack) into number, name,
//! arguments and where the call returns, filtered by number and by process
//! (CR3), written as JSON lines.
//!
//! The three entries and their Linux ABIs ([`SyscallEntry`]):
//! - `syscall` (LSTAR), x86-64: the number in RAX, arguments in RDI, RSI, RDX,
//!   R10, R8, R9; the instruction leaves the return address in RCX and keeps RSP.
//! - `int $0x80` (IDT gate 0x80), i386: the number in EAX, arguments in EBX, ECX,
//!   EDX, ESI, EDI, EBP; the return address and stack are in the interrupt frame
//!   at RSP (RIP at +0, RSP at +24).
//! - `sysenter` (SYSENTER_EIP), i386 as the vDSO's `__kernel_vsyscall` makes it:
//!   EAX, EBX, ECX, EDX, ESI, EDI as for `int $0x80`, the caller's stack in EBP
//!   with the sixth argument at [EBP] and, 32-bit slots, the return address of
//!   `__kernel_vsyscall`'s caller at [EBP+12]: the call returns there with
//!   RSP = RBP + 16. The instruction itself saves no return address.
//!
//! The result is in RAX (EAX for the i386 ABI) at the return address.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::hex;

/// How a system call entered the kernel, which says its ABI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyscallEntry {
    /// `syscall`, at LSTAR: the x86-64 ABI.
    #[default]
    Syscall,
    /// `sysenter`, at SYSENTER_EIP: the i386 ABI through the vDSO.
    Sysenter,
    /// `int $0x80`, at the handler of IDT gate 0x80: the i386 ABI.
    Int80,
}

impl SyscallEntry {
    /// Whether the ABI is the 32-bit one (32-bit number, arguments and result).
    pub fn is_i386(self) -> bool {
        self != Self::Syscall
    }

    /// The call's number.
    pub fn nr(self, regs: &SyscallRegs) -> u64 {
        self.width(regs.rax)
    }

    /// The name of call `nr` in this entry's ABI.
    pub fn name(self, nr: u64) -> Option<&'static str> {
        if self.is_i386() {
            syscall_name_i386(nr)
        } else {
            syscall_name(nr)
        }
    }

    /// A register as this ABI reads it (its low 32 bits for i386).
    fn width(self, v: u64) -> u64 {
        if self.is_i386() {
            v & 0xffff_ffff
        } else {
            v
        }
    }

    /// Where the call returns and with which stack pointer, `None` when the
    /// caller's stack cannot be read (see the module's description).
    pub fn return_point(self, regs: &SyscallRegs, read: &impl GuestRead) -> Option<ReturnPoint> {
        match self {
            Self::Syscall => Some(ReturnPoint {
                rip: regs.rcx,
                rsp: regs.rsp,
            }),
            Self::Int80 => Some(ReturnPoint {
                rip: read.read_u64(regs.rsp)?,
                rsp: read.read_u64(regs.rsp.wrapping_add(24))?,
            }),
            Self::Sysenter => Some(ReturnPoint {
                rip: read.read_u32(regs.rbp.wrapping_add(12))?,
                rsp: regs.rbp.wrapping_add(16),
            }),
        }
    }

    /// The result a call returns with `rax` at its return point.
    pub fn result(self, rax: u64) -> u64 {
        self.width(rax)
    }
}

/// The caller's memory, read at guest-virtual addresses of its address space.
pub trait GuestRead {
    /// Reads `N` bytes at `vaddr`; `None` where they do not translate.
    fn read<const N: usize>(&self, vaddr: u64) -> Option<[u8; N]>;

    fn read_u64(&self, vaddr: u64) -> Option<u64> {
        self.read::<8>(vaddr).map(u64::from_le_bytes)
    }

    fn read_u32(&self, vaddr: u64) -> Option<u64> {
        self.read::<4>(vaddr)
            .map(|b| u64::from(u32::from_le_bytes(b)))
    }
}

/// Where a call returns to the caller: the instruction and the stack pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReturnPoint {
    pub rip: u64,
    pub rsp: u64,
}

/// The registers of a vCPU stopped at a system call entry, and which entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallRegs {
    pub entry: SyscallEntry,
    pub rax: u64,
    pub rbx: u64,
    /// For `syscall`, the return address it saved (the instruction after it).
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    /// The calling process's address space.
    pub cr3: u64,
}

/// One system call, decoded. The integration layer adds a timestamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallRecord {
    pub vcpu: u32,
    /// How it entered: `"syscall"`, `"sysenter"` or `"int80"`.
    pub entry: SyscallEntry,
    /// The number (RAX; EAX for the i386 entries).
    pub nr: u64,
    /// Its name in the entry's ABI (Linux 6.1 x86-64 for `syscall`, i386 for the
    /// others); `null` for numbers that ABI does not have.
    pub name: Option<&'static str>,
    /// The six arguments of the entry's ABI, as `"0x..."`.
    #[serde(serialize_with = "hex::u64_vec::serialize")]
    pub args: [u64; 6],
    /// The caller's CR3 (which process), as `"0x..."`.
    #[serde(with = "hex::u64")]
    pub cr3: u64,
    /// Where the call returns to, as `"0x..."`; `null` when the caller's stack
    /// does not translate.
    #[serde(with = "hex::opt_u64")]
    pub return_rip: Option<u64>,
    /// What the call returned (RAX, EAX for the i386 entries, at the return
    /// address), as `"0x..."`; `null` when the return was not seen.
    #[serde(with = "hex::opt_u64")]
    pub ret: Option<u64>,
}

impl SyscallRecord {
    /// Decodes the call that vCPU `vcpu` is making, reading the caller's stack
    /// through `read` where the ABI keeps things there. An argument that does not
    /// translate reads as 0.
    pub fn decode(vcpu: u32, regs: &SyscallRegs, read: &impl GuestRead) -> Self {
        let entry = regs.entry;
        let nr = entry.nr(regs);
        let args = match entry {
            SyscallEntry::Syscall => [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
            SyscallEntry::Int80 | SyscallEntry::Sysenter => {
                let sixth = match entry {
                    SyscallEntry::Sysenter => read.read_u32(regs.rbp).unwrap_or(0),
                    _ => regs.rbp,
                };
                [regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, sixth].map(|v| entry.width(v))
            }
        };
        Self {
            vcpu,
            entry,
            nr,
            name: entry.name(nr),
            args,
            cr3: regs.cr3,
            return_rip: entry.return_point(regs, read).map(|r| r.rip),
            ret: None,
        }
    }

    /// One JSON object, without a newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a SyscallRecord always serializes")
    }

    /// One JSON line: the object and `\n`.
    pub fn to_json_line(&self) -> String {
        let mut s = self.to_json();
        s.push('\n');
        s
    }
}

/// The name of system call `nr` in the Linux x86-64 (64-bit) ABI, as of Linux
/// 6.1. `None` for unused numbers, numbers past 450 and the x32 range (512 and
/// up, which is not this ABI).
pub fn syscall_name(nr: u64) -> Option<&'static str> {
    NAMES.get(usize::try_from(nr).ok()?).copied().flatten()
}

/// The number of the system call called `name` (see [`syscall_name`]).
pub fn syscall_number(name: &str) -> Option<u64> {
    NAMES
        .iter()
        .position(|n| *n == Some(name))
        .map(|i| i as u64)
}

/// The name of system call `nr` in the Linux i386 ABI, as of Linux 6.1.
pub fn syscall_name_i386(nr: u64) -> Option<&'static str> {
    NAMES_I386.get(usize::try_from(nr).ok()?).copied().flatten()
}

/// `name` as either table spells it, if one has it.
fn known_name(name: &str) -> Option<&'static str> {
    NAMES
        .iter()
        .chain(&NAMES_I386)
        .flatten()
        .copied()
        .find(|n| *n == name)
}

/// The highest number [`syscall_name`] knows, plus one (`NR_syscalls` of Linux 6.1
/// x86-64: 451).
pub const SYSCALL_COUNT: usize = NAMES.len();

/// A filter string that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "syscall filter: unknown system call {0:?} (not a Linux x86-64 or i386 name, nor a number)"
    )]
    UnknownName(String),
    #[error("syscall filter: cr3={0:?} is not a hex number")]
    BadCr3(String),
    #[error("syscall filter: cr3 given twice")]
    Cr3Twice,
}

/// Which system calls to record: by name or number (none given: all) and by
/// process (CR3; none: all processes). A name stands for its number in each ABI
/// (`write` is 1 for `syscall`, 4 for `int $0x80` and `sysenter`); a number is
/// compared with the call's number whatever its ABI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyscallFilter {
    numbers: BTreeSet<u64>,
    names: BTreeSet<&'static str>,
    cr3: Option<u64>,
}

/// CR3 bits that are not the page-table address: PCID (0..11) and the no-flush
/// bit 63. Two CR3s of the same process differ only there.
pub(crate) const CR3_ADDR: u64 = 0x000f_ffff_ffff_f000;

impl SyscallFilter {
    /// Every call of every process.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses `read,write,59,cr3=0x1234000`: comma-separated system call names or
    /// numbers (decimal or `0x` hex; a number need not have a name) and at most
    /// one `cr3=HEX` (the `0x` is optional). Blank items are ignored; an empty
    /// string is [`SyscallFilter::all`].
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        let mut numbers = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut cr3 = None;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some(v) = item.strip_prefix("cr3=") {
                if cr3.is_some() {
                    return Err(FilterError::Cr3Twice);
                }
                let h = v.trim();
                let h = h
                    .strip_prefix("0x")
                    .or_else(|| h.strip_prefix("0X"))
                    .unwrap_or(h);
                cr3 = Some(
                    u64::from_str_radix(h, 16).map_err(|_| FilterError::BadCr3(v.to_owned()))?,
                );
            } else if let Some(name) = known_name(item) {
                names.insert(name);
            } else if item.starts_with(|c: char| c.is_ascii_digit()) {
                let nr =
                    hex::parse_u64(item).map_err(|_| FilterError::UnknownName(item.to_owned()))?;
                numbers.insert(nr);
            } else {
                return Err(FilterError::UnknownName(item.to_owned()));
            }
        }
        Ok(Self {
            numbers,
            names,
            cr3,
        })
    }

    /// Only these numbers (with no names, an empty list: all).
    pub fn with_numbers(mut self, nrs: impl IntoIterator<Item = u64>) -> Self {
        self.numbers = nrs.into_iter().collect();
        self
    }

    /// Only the process with this CR3 (its PCID and bit 63 are ignored).
    pub fn with_cr3(mut self, cr3: u64) -> Self {
        self.cr3 = Some(cr3);
        self
    }

    /// The numbers it keeps (given as numbers).
    pub fn numbers(&self) -> &BTreeSet<u64> {
        &self.numbers
    }

    /// The names it keeps.
    pub fn names(&self) -> &BTreeSet<&'static str> {
        &self.names
    }

    /// The CR3 it keeps, `None` for all.
    pub fn cr3(&self) -> Option<u64> {
        self.cr3
    }

    /// Whether a call with these registers is to be recorded (its number is the
    /// entry's own: EAX for the i386 entries).
    pub fn matches(&self, regs: &SyscallRegs) -> bool {
        let nr = regs.entry.nr(regs);
        let any = self.numbers.is_empty() && self.names.is_empty();
        (any || self.numbers.contains(&nr)
            || regs.entry.name(nr).is_some_and(|n| self.names.contains(n)))
            && self.cr3.is_none_or(|c| c & CR3_ADDR == regs.cr3 & CR3_ADDR)
    }
}

/// Linux x86-64 system call names by number: the `common` and `64` entries of
/// `arch/x86/entry/syscalls/syscall_64.tbl` in Linux 6.1 (0 `read` to 450
/// `set_mempolicy_home_node`; 335..=423 are unused). Generated from that file.
#[rustfmt::skip]
const NAMES: [Option<&str>; 451] = [
    /* 0 */ Some("read"),
    /* 1 */ Some("write"),
    /* 2 */ Some("open"),
    /* 3 */ Some("close"),
    /* 4 */ Some("stat"),
    /* 5 */ Some("fstat"),
    /* 6 */ Some("lstat"),
    /* 7 */ Some("poll"),
    /* 8 */ Some("lseek"),
    /* 9 */ Some("mmap"),
    /* 10 */ Some("mprotect"),
    /* 11 */ Some("munmap"),
    /* 12 */ Some("brk"),
    /* 13 */ Some("rt_sigaction"),
    /* 14 */ Some("rt_sigprocmask"),
    /* 15 */ Some("rt_sigreturn"),
    /* 16 */ Some("ioctl"),
    /* 17 */ Some("pread64"),
    /* 18 */ Some("pwrite64"),
    /* 19 */ Some("readv"),
    /* 20 */ Some("writev"),
    /* 21 */ Some("access"),
    /* 22 */ Some("pipe"),
    /* 23 */ Some("select"),
    /* 24 */ Some("sched_yield"),
    /* 25 */ Some("mremap"),
    /* 26 */ Some("msync"),
    /* 27 */ Some("mincore"),
    /* 28 */ Some("madvise"),
    /* 29 */ Some("shmget"),
    /* 30 */ Some("shmat"),
    /* 31 */ Some("shmctl"),
    /* 32 */ Some("dup"),
    /* 33 */ Some("dup2"),
    /* 34 */ Some("pause"),
    /* 35 */ Some("nanosleep"),
    /* 36 */ Some("getitimer"),
    /* 37 */ Some("alarm"),
    /* 38 */ Some("setitimer"),
    /* 39 */ Some("getpid"),
    /* 40 */ Some("sendfile"),
    /* 41 */ Some("socket"),
    /* 42 */ Some("connect"),
    /* 43 */ Some("accept"),
    /* 44 */ Some("sendto"),
    /* 45 */ Some("recvfrom"),
    /* 46 */ Some("sendmsg"),
    /* 47 */ Some("recvmsg"),
    /* 48 */ Some("shutdown"),
    /* 49 */ Some("bind"),
    /* 50 */ Some("listen"),
    /* 51 */ Some("getsockname"),
    /* 52 */ Some("getpeername"),
    /* 53 */ Some("socketpair"),
    /* 54 */ Some("setsockopt"),
    /* 55 */ Some("getsockopt"),
    /* 56 */ Some("clone"),
    /* 57 */ Some("fork"),
    /* 58 */ Some("vfork"),
    /* 59 */ Some("execve"),
    /* 60 */ Some("exit"),
    /* 61 */ Some("wait4"),
    /* 62 */ Some("kill"),
    /* 63 */ Some("uname"),
    /* 64 */ Some("semget"),
    /* 65 */ Some("semop"),
    /* 66 */ Some("semctl"),
    /* 67 */ Some("shmdt"),
    /* 68 */ Some("msgget"),
    /* 69 */ Some("msgsnd"),
    /* 70 */ Some("msgrcv"),
    /* 71 */ Some("msgctl"),
    /* 72 */ Some("fcntl"),
    /* 73 */ Some("flock"),
    /* 74 */ Some("fsync"),
    /* 75 */ Some("fdatasync"),
    /* 76 */ Some("truncate"),
    /* 77 */ Some("ftruncate"),
    /* 78 */ Some("getdents"),
    /* 79 */ Some("getcwd"),
    /* 80 */ Some("chdir"),
    /* 81 */ Some("fchdir"),
    /* 82 */ Some("rename"),
    /* 83 */ Some("mkdir"),
    /* 84 */ Some("rmdir"),
    /* 85 */ Some("creat"),
    /* 86 */ Some("link"),
    /* 87 */ Some("unlink"),
    /* 88 */ Some("symlink"),
    /* 89 */ Some("readlink"),
    /* 90 */ Some("chmod"),
    /* 91 */ Some("fchmod"),
    /* 92 */ Some("chown"),
    /* 93 */ Some("fchown"),
    /* 94 */ Some("lchown"),
    /* 95 */ Some("umask"),
    /* 96 */ Some("gettimeofday"),
    /* 97 */ Some("getrlimit"),
    /* 98 */ Some("getrusage"),
    /* 99 */ Some("sysinfo"),
    /* 100 */ Some("times"),
    /* 101 */ Some("ptrace"),
    /* 102 */ Some("getuid"),
    /* 103 */ Some("syslog"),
    /* 104 */ Some("getgid"),
    /* 105 */ Some("setuid"),
    /* 106 */ Some("setgid"),
    /* 107 */ Some("geteuid"),
    /* 108 */ Some("getegid"),
    /* 109 */ Some("setpgid"),
    /* 110 */ Some("getppid"),
    /* 111 */ Some("getpgrp"),
    /* 112 */ Some("setsid"),
    /* 113 */ Some("setreuid"),
    /* 114 */ Some("setregid"),
    /* 115 */ Some("getgroups"),
    /* 116 */ Some("setgroups"),
    /* 117 */ Some("setresuid"),
    /* 118 */ Some("getresuid"),
    /* 119 */ Some("setresgid"),
    /* 120 */ Some("getresgid"),
    /* 121 */ Some("getpgid"),
    /* 122 */ Some("setfsuid"),
    /* 123 */ Some("setfsgid"),
    /* 124 */ Some("getsid"),
    /* 125 */ Some("capget"),
    /* 126 */ Some("capset"),
    /* 127 */ Some("rt_sigpending"),
    /* 128 */ Some("rt_sigtimedwait"),
    /* 129 */ Some("rt_sigqueueinfo"),
    /* 130 */ Some("rt_sigsuspend"),
    /* 131 */ Some("sigaltstack"),
    /* 132 */ Some("utime"),
    /* 133 */ Some("mknod"),
    /* 134 */ Some("uselib"),
    /* 135 */ Some("personality"),
    /* 136 */ Some("ustat"),
    /* 137 */ Some("statfs"),
    /* 138 */ Some("fstatfs"),
    /* 139 */ Some("sysfs"),
    /* 140 */ Some("getpriority"),
    /* 141 */ Some("setpriority"),
    /* 142 */ Some("sched_setparam"),
    /* 143 */ Some("sched_getparam"),
    /* 144 */ Some("sched_setscheduler"),
    /* 145 */ Some("sched_getscheduler"),
    /* 146 */ Some("sched_get_priority_max"),
    /* 147 */ Some("sched_get_priority_min"),
    /* 148 */ Some("sched_rr_get_interval"),
    /* 149 */ Some("mlock"),
    /* 150 */ Some("munlock"),
    /* 151 */ Some("mlockall"),
    /* 152 */ Some("munlockall"),
    /* 153 */ Some("vhangup"),
    /* 154 */ Some("modify_ldt"),
    /* 155 */ Some("pivot_root"),
    /* 156 */ Some("_sysctl"),
    /* 157 */ Some("prctl"),
    /* 158 */ Some("arch_prctl"),
    /* 159 */ Some("adjtimex"),
    /* 160 */ Some("setrlimit"),
    /* 161 */ Some("chroot"),
    /* 162 */ Some("sync"),
    /* 163 */ Some("acct"),
    /* 164 */ Some("settimeofday"),
    /* 165 */ Some("mount"),
    /* 166 */ Some("umount2"),
    /* 167 */ Some("swapon"),
    /* 168 */ Some("swapoff"),
    /* 169 */ Some("reboot"),
    /* 170 */ Some("sethostname"),
    /* 171 */ Some("setdomainname"),
    /* 172 */ Some("iopl"),
    /* 173 */ Some("ioperm"),
    /* 174 */ Some("create_module"),
    /* 175 */ Some("init_module"),
    /* 176 */ Some("delete_module"),
    /* 177 */ Some("get_kernel_syms"),
    /* 178 */ Some("query_module"),
    /* 179 */ Some("quotactl"),
    /* 180 */ Some("nfsservctl"),
    /* 181 */ Some("getpmsg"),
    /* 182 */ Some("putpmsg"),
    /* 183 */ Some("afs_syscall"),
    /* 184 */ Some("tuxcall"),
    /* 185 */ Some("security"),
    /* 186 */ Some("gettid"),
    /* 187 */ Some("readahead"),
    /* 188 */ Some("setxattr"),
    /* 189 */ Some("lsetxattr"),
    /* 190 */ Some("fsetxattr"),
    /* 191 */ Some("getxattr"),
    /* 192 */ Some("lgetxattr"),
    /* 193 */ Some("fgetxattr"),
    /* 194 */ Some("listxattr"),
    /* 195 */ Some("llistxattr"),
    /* 196 */ Some("flistxattr"),
    /* 197 */ Some("removexattr"),
    /* 198 */ Some("lremovexattr"),
    /* 199 */ Some("fremovexattr"),
    /* 200 */ Some("tkill"),
    /* 201 */ Some("time"),
    /* 202 */ Some("futex"),
    /* 203 */ Some("sched_setaffinity"),
    /* 204 */ Some("sched_getaffinity"),
    /* 205 */ Some("set_thread_area"),
    /* 206 */ Some("io_setup"),
    /* 207 */ Some("io_destroy"),
    /* 208 */ Some("io_getevents"),
    /* 209 */ Some("io_submit"),
    /* 210 */ Some("io_cancel"),
    /* 211 */ Some("get_thread_area"),
    /* 212 */ Some("lookup_dcookie"),
    /* 213 */ Some("epoll_create"),
    /* 214 */ Some("epoll_ctl_old"),
    /* 215 */ Some("epoll_wait_old"),
    /* 216 */ Some("remap_file_pages"),
    /* 217 */ Some("getdents64"),
    /* 218 */ Some("set_tid_address"),
    /* 219 */ Some("restart_syscall"),
    /* 220 */ Some("semtimedop"),
    /* 221 */ Some("fadvise64"),
    /* 222 */ Some("timer_create"),
    /* 223 */ Some("timer_settime"),
    /* 224 */ Some("timer_gettime"),
    /* 225 */ Some("timer_getoverrun"),
    /* 226 */ Some("timer_delete"),
    /* 227 */ Some("clock_settime"),
    /* 228 */ Some("clock_gettime"),
    /* 229 */ Some("clock_getres"),
    /* 230 */ Some("clock_nanosleep"),
    /* 231 */ Some("exit_group"),
    /* 232 */ Some("epoll_wait"),
    /* 233 */ Some("epoll_ctl"),
    /* 234 */ Some("tgkill"),
    /* 235 */ Some("utimes"),
    /* 236 */ Some("vserver"),
    /* 237 */ Some("mbind"),
    /* 238 */ Some("set_mempolicy"),
    /* 239 */ Some("get_mempolicy"),
    /* 240 */ Some("mq_open"),
    /* 241 */ Some("mq_unlink"),
    /* 242 */ Some("mq_timedsend"),
    /* 243 */ Some("mq_timedreceive"),
    /* 244 */ Some("mq_notify"),
    /* 245 */ Some("mq_getsetattr"),
    /* 246 */ Some("kexec_load"),
    /* 247 */ Some("waitid"),
    /* 248 */ Some("add_key"),
    /* 249 */ Some("request_key"),
    /* 250 */ Some("keyctl"),
    /* 251 */ Some("ioprio_set"),
    /* 252 */ Some("ioprio_get"),
    /* 253 */ Some("inotify_init"),
    /* 254 */ Some("inotify_add_watch"),
    /* 255 */ Some("inotify_rm_watch"),
    /* 256 */ Some("migrate_pages"),
    /* 257 */ Some("openat"),
    /* 258 */ Some("mkdirat"),
    /* 259 */ Some("mknodat"),
    /* 260 */ Some("fchownat"),
    /* 261 */ Some("futimesat"),
    /* 262 */ Some("newfstatat"),
    /* 263 */ Some("unlinkat"),
    /* 264 */ Some("renameat"),
    /* 265 */ Some("linkat"),
    /* 266 */ Some("symlinkat"),
    /* 267 */ Some("readlinkat"),
    /* 268 */ Some("fchmodat"),
    /* 269 */ Some("faccessat"),
    /* 270 */ Some("pselect6"),
    /* 271 */ Some("ppoll"),
    /* 272 */ Some("unshare"),
    /* 273 */ Some("set_robust_list"),
    /* 274 */ Some("get_robust_list"),
    /* 275 */ Some("splice"),
    /* 276 */ Some("tee"),
    /* 277 */ Some("sync_file_range"),
    /* 278 */ Some("vmsplice"),
    /* 279 */ Some("move_pages"),
    /* 280 */ Some("utimensat"),
    /* 281 */ Some("epoll_pwait"),
    /* 282 */ Some("signalfd"),
    /* 283 */ Some("timerfd_create"),
    /* 284 */ Some("eventfd"),
    /* 285 */ Some("fallocate"),
    /* 286 */ Some("timerfd_settime"),
    /* 287 */ Some("timerfd_gettime"),
    /* 288 */ Some("accept4"),
    /* 289 */ Some("signalfd4"),
    /* 290 */ Some("eventfd2"),
    /* 291 */ Some("epoll_create1"),
    /* 292 */ Some("dup3"),
    /* 293 */ Some("pipe2"),
    /* 294 */ Some("inotify_init1"),
    /* 295 */ Some("preadv"),
    /* 296 */ Some("pwritev"),
    /* 297 */ Some("rt_tgsigqueueinfo"),
    /* 298 */ Some("perf_event_open"),
    /* 299 */ Some("recvmmsg"),
    /* 300 */ Some("fanotify_init"),
    /* 301 */ Some("fanotify_mark"),
    /* 302 */ Some("prlimit64"),
    /* 303 */ Some("name_to_handle_at"),
    /* 304 */ Some("open_by_handle_at"),
    /* 305 */ Some("clock_adjtime"),
    /* 306 */ Some("syncfs"),
    /* 307 */ Some("sendmmsg"),
    /* 308 */ Some("setns"),
    /* 309 */ Some("getcpu"),
    /* 310 */ Some("process_vm_readv"),
    /* 311 */ Some("process_vm_writev"),
    /* 312 */ Some("kcmp"),
    /* 313 */ Some("finit_module"),
    /* 314 */ Some("sched_setattr"),
    /* 315 */ Some("sched_getattr"),
    /* 316 */ Some("renameat2"),
    /* 317 */ Some("seccomp"),
    /* 318 */ Some("getrandom"),
    /* 319 */ Some("memfd_create"),
    /* 320 */ Some("kexec_file_load"),
    /* 321 */ Some("bpf"),
    /* 322 */ Some("execveat"),
    /* 323 */ Some("userfaultfd"),
    /* 324 */ Some("membarrier"),
    /* 325 */ Some("mlock2"),
    /* 326 */ Some("copy_file_range"),
    /* 327 */ Some("preadv2"),
    /* 328 */ Some("pwritev2"),
    /* 329 */ Some("pkey_mprotect"),
    /* 330 */ Some("pkey_alloc"),
    /* 331 */ Some("pkey_free"),
    /* 332 */ Some("statx"),
    /* 333 */ Some("io_pgetevents"),
    /* 334 */ Some("rseq"),
    /* 335 */ None,
    /* 336 */ None,
    /* 337 */ None,
    /* 338 */ None,
    /* 339 */ None,
    /* 340 */ None,
    /* 341 */ None,
    /* 342 */ None,
    /* 343 */ None,
    /* 344 */ None,
    /* 345 */ None,
    /* 346 */ None,
    /* 347 */ None,
    /* 348 */ None,
    /* 349 */ None,
    /* 350 */ None,
    /* 351 */ None,
    /* 352 */ None,
    /* 353 */ None,
    /* 354 */ None,
    /* 355 */ None,
    /* 356 */ None,
    /* 357 */ None,
    /* 358 */ None,
    /* 359 */ None,
    /* 360 */ None,
    /* 361 */ None,
    /* 362 */ None,
    /* 363 */ None,
    /* 364 */ None,
    /* 365 */ None,
    /* 366 */ None,
    /* 367 */ None,
    /* 368 */ None,
    /* 369 */ None,
    /* 370 */ None,
    /* 371 */ None,
    /* 372 */ None,
    /* 373 */ None,
    /* 374 */ None,
    /* 375 */ None,
    /* 376 */ None,
    /* 377 */ None,
    /* 378 */ None,
    /* 379 */ None,
    /* 380 */ None,
    /* 381 */ None,
    /* 382 */ None,
    /* 383 */ None,
    /* 384 */ None,
    /* 385 */ None,
    /* 386 */ None,
    /* 387 */ None,
    /* 388 */ None,
    /* 389 */ None,
    /* 390 */ None,
    /* 391 */ None,
    /* 392 */ None,
    /* 393 */ None,
    /* 394 */ None,
    /* 395 */ None,
    /* 396 */ None,
    /* 397 */ None,
    /* 398 */ None,
    /* 399 */ None,
    /* 400 */ None,
    /* 401 */ None,
    /* 402 */ None,
    /* 403 */ None,
    /* 404 */ None,
    /* 405 */ None,
    /* 406 */ None,
    /* 407 */ None,
    /* 408 */ None,
    /* 409 */ None,
    /* 410 */ None,
    /* 411 */ None,
    /* 412 */ None,
    /* 413 */ None,
    /* 414 */ None,
    /* 415 */ None,
    /* 416 */ None,
    /* 417 */ None,
    /* 418 */ None,
    /* 419 */ None,
    /* 420 */ None,
    /* 421 */ None,
    /* 422 */ None,
    /* 423 */ None,
    /* 424 */ Some("pidfd_send_signal"),
    /* 425 */ Some("io_uring_setup"),
    /* 426 */ Some("io_uring_enter"),
    /* 427 */ Some("io_uring_register"),
    /* 428 */ Some("open_tree"),
    /* 429 */ Some("move_mount"),
    /* 430 */ Some("fsopen"),
    /* 431 */ Some("fsconfig"),
    /* 432 */ Some("fsmount"),
    /* 433 */ Some("fspick"),
    /* 434 */ Some("pidfd_open"),
    /* 435 */ Some("clone3"),
    /* 436 */ Some("close_range"),
    /* 437 */ Some("openat2"),
    /* 438 */ Some("pidfd_getfd"),
    /* 439 */ Some("faccessat2"),
    /* 440 */ Some("process_madvise"),
    /* 441 */ Some("epoll_pwait2"),
    /* 442 */ Some("mount_setattr"),
    /* 443 */ Some("quotactl_fd"),
    /* 444 */ Some("landlock_create_ruleset"),
    /* 445 */ Some("landlock_add_rule"),
    /* 446 */ Some("landlock_restrict_self"),
    /* 447 */ Some("memfd_secret"),
    /* 448 */ Some("process_mrelease"),
    /* 449 */ Some("futex_waitv"),
    /* 450 */ Some("set_mempolicy_home_node"),
];

/// Linux i386 system call names by number (what `int $0x80` and `sysenter` take):
/// the entries of `arch/x86/entry/syscalls/syscall_32.tbl` in Linux 6.1 (0
/// `restart_syscall` to 450 `set_mempolicy_home_node`; 222, 223, 251, 285, 387..=392
/// and 415 are unused; the
/// historical ones without an implementation, such as 17 `break`, keep their
/// names). Generated from that file (Debian's `linux-source-6.1`).
#[rustfmt::skip]
const NAMES_I386: [Option<&str>; 451] = [
    /* 0 */ Some("restart_syscall"),
    /* 1 */ Some("exit"),
    /* 2 */ Some("fork"),
    /* 3 */ Some("read"),
    /* 4 */ Some("write"),
    /* 5 */ Some("open"),
    /* 6 */ Some("close"),
    /* 7 */ Some("waitpid"),
    /* 8 */ Some("creat"),
    /* 9 */ Some("link"),
    /* 10 */ Some("unlink"),
    /* 11 */ Some("execve"),
    /* 12 */ Some("chdir"),
    /* 13 */ Some("time"),
    /* 14 */ Some("mknod"),
    /* 15 */ Some("chmod"),
    /* 16 */ Some("lchown"),
    /* 17 */ Some("break"),
    /* 18 */ Some("oldstat"),
    /* 19 */ Some("lseek"),
    /* 20 */ Some("getpid"),
    /* 21 */ Some("mount"),
    /* 22 */ Some("umount"),
    /* 23 */ Some("setuid"),
    /* 24 */ Some("getuid"),
    /* 25 */ Some("stime"),
    /* 26 */ Some("ptrace"),
    /* 27 */ Some("alarm"),
    /* 28 */ Some("oldfstat"),
    /* 29 */ Some("pause"),
    /* 30 */ Some("utime"),
    /* 31 */ Some("stty"),
    /* 32 */ Some("gtty"),
    /* 33 */ Some("access"),
    /* 34 */ Some("nice"),
    /* 35 */ Some("ftime"),
    /* 36 */ Some("sync"),
    /* 37 */ Some("kill"),
    /* 38 */ Some("rename"),
    /* 39 */ Some("mkdir"),
    /* 40 */ Some("rmdir"),
    /* 41 */ Some("dup"),
    /* 42 */ Some("pipe"),
    /* 43 */ Some("times"),
    /* 44 */ Some("prof"),
    /* 45 */ Some("brk"),
    /* 46 */ Some("setgid"),
    /* 47 */ Some("getgid"),
    /* 48 */ Some("signal"),
    /* 49 */ Some("geteuid"),
    /* 50 */ Some("getegid"),
    /* 51 */ Some("acct"),
    /* 52 */ Some("umount2"),
    /* 53 */ Some("lock"),
    /* 54 */ Some("ioctl"),
    /* 55 */ Some("fcntl"),
    /* 56 */ Some("mpx"),
    /* 57 */ Some("setpgid"),
    /* 58 */ Some("ulimit"),
    /* 59 */ Some("oldolduname"),
    /* 60 */ Some("umask"),
    /* 61 */ Some("chroot"),
    /* 62 */ Some("ustat"),
    /* 63 */ Some("dup2"),
    /* 64 */ Some("getppid"),
    /* 65 */ Some("getpgrp"),
    /* 66 */ Some("setsid"),
    /* 67 */ Some("sigaction"),
    /* 68 */ Some("sgetmask"),
    /* 69 */ Some("ssetmask"),
    /* 70 */ Some("setreuid"),
    /* 71 */ Some("setregid"),
    /* 72 */ Some("sigsuspend"),
    /* 73 */ Some("sigpending"),
    /* 74 */ Some("sethostname"),
    /* 75 */ Some("setrlimit"),
    /* 76 */ Some("getrlimit"),
    /* 77 */ Some("getrusage"),
    /* 78 */ Some("gettimeofday"),
    /* 79 */ Some("settimeofday"),
    /* 80 */ Some("getgroups"),
    /* 81 */ Some("setgroups"),
    /* 82 */ Some("select"),
    /* 83 */ Some("symlink"),
    /* 84 */ Some("oldlstat"),
    /* 85 */ Some("readlink"),
    /* 86 */ Some("uselib"),
    /* 87 */ Some("swapon"),
    /* 88 */ Some("reboot"),
    /* 89 */ Some("readdir"),
    /* 90 */ Some("mmap"),
    /* 91 */ Some("munmap"),
    /* 92 */ Some("truncate"),
    /* 93 */ Some("ftruncate"),
    /* 94 */ Some("fchmod"),
    /* 95 */ Some("fchown"),
    /* 96 */ Some("getpriority"),
    /* 97 */ Some("setpriority"),
    /* 98 */ Some("profil"),
    /* 99 */ Some("statfs"),
    /* 100 */ Some("fstatfs"),
    /* 101 */ Some("ioperm"),
    /* 102 */ Some("socketcall"),
    /* 103 */ Some("syslog"),
    /* 104 */ Some("setitimer"),
    /* 105 */ Some("getitimer"),
    /* 106 */ Some("stat"),
    /* 107 */ Some("lstat"),
    /* 108 */ Some("fstat"),
    /* 109 */ Some("olduname"),
    /* 110 */ Some("iopl"),
    /* 111 */ Some("vhangup"),
    /* 112 */ Some("idle"),
    /* 113 */ Some("vm86old"),
    /* 114 */ Some("wait4"),
    /* 115 */ Some("swapoff"),
    /* 116 */ Some("sysinfo"),
    /* 117 */ Some("ipc"),
    /* 118 */ Some("fsync"),
    /* 119 */ Some("sigreturn"),
    /* 120 */ Some("clone"),
    /* 121 */ Some("setdomainname"),
    /* 122 */ Some("uname"),
    /* 123 */ Some("modify_ldt"),
    /* 124 */ Some("adjtimex"),
    /* 125 */ Some("mprotect"),
    /* 126 */ Some("sigprocmask"),
    /* 127 */ Some("create_module"),
    /* 128 */ Some("init_module"),
    /* 129 */ Some("delete_module"),
    /* 130 */ Some("get_kernel_syms"),
    /* 131 */ Some("quotactl"),
    /* 132 */ Some("getpgid"),
    /* 133 */ Some("fchdir"),
    /* 134 */ Some("bdflush"),
    /* 135 */ Some("sysfs"),
    /* 136 */ Some("personality"),
    /* 137 */ Some("afs_syscall"),
    /* 138 */ Some("setfsuid"),
    /* 139 */ Some("setfsgid"),
    /* 140 */ Some("_llseek"),
    /* 141 */ Some("getdents"),
    /* 142 */ Some("_newselect"),
    /* 143 */ Some("flock"),
    /* 144 */ Some("msync"),
    /* 145 */ Some("readv"),
    /* 146 */ Some("writev"),
    /* 147 */ Some("getsid"),
    /* 148 */ Some("fdatasync"),
    /* 149 */ Some("_sysctl"),
    /* 150 */ Some("mlock"),
    /* 151 */ Some("munlock"),
    /* 152 */ Some("mlockall"),
    /* 153 */ Some("munlockall"),
    /* 154 */ Some("sched_setparam"),
    /* 155 */ Some("sched_getparam"),
    /* 156 */ Some("sched_setscheduler"),
    /* 157 */ Some("sched_getscheduler"),
    /* 158 */ Some("sched_yield"),
    /* 159 */ Some("sched_get_priority_max"),
    /* 160 */ Some("sched_get_priority_min"),
    /* 161 */ Some("sched_rr_get_interval"),
    /* 162 */ Some("nanosleep"),
    /* 163 */ Some("mremap"),
    /* 164 */ Some("setresuid"),
    /* 165 */ Some("getresuid"),
    /* 166 */ Some("vm86"),
    /* 167 */ Some("query_module"),
    /* 168 */ Some("poll"),
    /* 169 */ Some("nfsservctl"),
    /* 170 */ Some("setresgid"),
    /* 171 */ Some("getresgid"),
    /* 172 */ Some("prctl"),
    /* 173 */ Some("rt_sigreturn"),
    /* 174 */ Some("rt_sigaction"),
    /* 175 */ Some("rt_sigprocmask"),
    /* 176 */ Some("rt_sigpending"),
    /* 177 */ Some("rt_sigtimedwait"),
    /* 178 */ Some("rt_sigqueueinfo"),
    /* 179 */ Some("rt_sigsuspend"),
    /* 180 */ Some("pread64"),
    /* 181 */ Some("pwrite64"),
    /* 182 */ Some("chown"),
    /* 183 */ Some("getcwd"),
    /* 184 */ Some("capget"),
    /* 185 */ Some("capset"),
    /* 186 */ Some("sigaltstack"),
    /* 187 */ Some("sendfile"),
    /* 188 */ Some("getpmsg"),
    /* 189 */ Some("putpmsg"),
    /* 190 */ Some("vfork"),
    /* 191 */ Some("ugetrlimit"),
    /* 192 */ Some("mmap2"),
    /* 193 */ Some("truncate64"),
    /* 194 */ Some("ftruncate64"),
    /* 195 */ Some("stat64"),
    /* 196 */ Some("lstat64"),
    /* 197 */ Some("fstat64"),
    /* 198 */ Some("lchown32"),
    /* 199 */ Some("getuid32"),
    /* 200 */ Some("getgid32"),
    /* 201 */ Some("geteuid32"),
    /* 202 */ Some("getegid32"),
    /* 203 */ Some("setreuid32"),
    /* 204 */ Some("setregid32"),
    /* 205 */ Some("getgroups32"),
    /* 206 */ Some("setgroups32"),
    /* 207 */ Some("fchown32"),
    /* 208 */ Some("setresuid32"),
    /* 209 */ Some("getresuid32"),
    /* 210 */ Some("setresgid32"),
    /* 211 */ Some("getresgid32"),
    /* 212 */ Some("chown32"),
    /* 213 */ Some("setuid32"),
    /* 214 */ Some("setgid32"),
    /* 215 */ Some("setfsuid32"),
    /* 216 */ Some("setfsgid32"),
    /* 217 */ Some("pivot_root"),
    /* 218 */ Some("mincore"),
    /* 219 */ Some("madvise"),
    /* 220 */ Some("getdents64"),
    /* 221 */ Some("fcntl64"),
    /* 222 */ None,
    /* 223 */ None,
    /* 224 */ Some("gettid"),
    /* 225 */ Some("readahead"),
    /* 226 */ Some("setxattr"),
    /* 227 */ Some("lsetxattr"),
    /* 228 */ Some("fsetxattr"),
    /* 229 */ Some("getxattr"),
    /* 230 */ Some("lgetxattr"),
    /* 231 */ Some("fgetxattr"),
    /* 232 */ Some("listxattr"),
    /* 233 */ Some("llistxattr"),
    /* 234 */ Some("flistxattr"),
    /* 235 */ Some("removexattr"),
    /* 236 */ Some("lremovexattr"),
    /* 237 */ Some("fremovexattr"),
    /* 238 */ Some("tkill"),
    /* 239 */ Some("sendfile64"),
    /* 240 */ Some("futex"),
    /* 241 */ Some("sched_setaffinity"),
    /* 242 */ Some("sched_getaffinity"),
    /* 243 */ Some("set_thread_area"),
    /* 244 */ Some("get_thread_area"),
    /* 245 */ Some("io_setup"),
    /* 246 */ Some("io_destroy"),
    /* 247 */ Some("io_getevents"),
    /* 248 */ Some("io_submit"),
    /* 249 */ Some("io_cancel"),
    /* 250 */ Some("fadvise64"),
    /* 251 */ None,
    /* 252 */ Some("exit_group"),
    /* 253 */ Some("lookup_dcookie"),
    /* 254 */ Some("epoll_create"),
    /* 255 */ Some("epoll_ctl"),
    /* 256 */ Some("epoll_wait"),
    /* 257 */ Some("remap_file_pages"),
    /* 258 */ Some("set_tid_address"),
    /* 259 */ Some("timer_create"),
    /* 260 */ Some("timer_settime"),
    /* 261 */ Some("timer_gettime"),
    /* 262 */ Some("timer_getoverrun"),
    /* 263 */ Some("timer_delete"),
    /* 264 */ Some("clock_settime"),
    /* 265 */ Some("clock_gettime"),
    /* 266 */ Some("clock_getres"),
    /* 267 */ Some("clock_nanosleep"),
    /* 268 */ Some("statfs64"),
    /* 269 */ Some("fstatfs64"),
    /* 270 */ Some("tgkill"),
    /* 271 */ Some("utimes"),
    /* 272 */ Some("fadvise64_64"),
    /* 273 */ Some("vserver"),
    /* 274 */ Some("mbind"),
    /* 275 */ Some("get_mempolicy"),
    /* 276 */ Some("set_mempolicy"),
    /* 277 */ Some("mq_open"),
    /* 278 */ Some("mq_unlink"),
    /* 279 */ Some("mq_timedsend"),
    /* 280 */ Some("mq_timedreceive"),
    /* 281 */ Some("mq_notify"),
    /* 282 */ Some("mq_getsetattr"),
    /* 283 */ Some("kexec_load"),
    /* 284 */ Some("waitid"),
    /* 285 */ None,
    /* 286 */ Some("add_key"),
    /* 287 */ Some("request_key"),
    /* 288 */ Some("keyctl"),
    /* 289 */ Some("ioprio_set"),
    /* 290 */ Some("ioprio_get"),
    /* 291 */ Some("inotify_init"),
    /* 292 */ Some("inotify_add_watch"),
    /* 293 */ Some("inotify_rm_watch"),
    /* 294 */ Some("migrate_pages"),
    /* 295 */ Some("openat"),
    /* 296 */ Some("mkdirat"),
    /* 297 */ Some("mknodat"),
    /* 298 */ Some("fchownat"),
    /* 299 */ Some("futimesat"),
    /* 300 */ Some("fstatat64"),
    /* 301 */ Some("unlinkat"),
    /* 302 */ Some("renameat"),
    /* 303 */ Some("linkat"),
    /* 304 */ Some("symlinkat"),
    /* 305 */ Some("readlinkat"),
    /* 306 */ Some("fchmodat"),
    /* 307 */ Some("faccessat"),
    /* 308 */ Some("pselect6"),
    /* 309 */ Some("ppoll"),
    /* 310 */ Some("unshare"),
    /* 311 */ Some("set_robust_list"),
    /* 312 */ Some("get_robust_list"),
    /* 313 */ Some("splice"),
    /* 314 */ Some("sync_file_range"),
    /* 315 */ Some("tee"),
    /* 316 */ Some("vmsplice"),
    /* 317 */ Some("move_pages"),
    /* 318 */ Some("getcpu"),
    /* 319 */ Some("epoll_pwait"),
    /* 320 */ Some("utimensat"),
    /* 321 */ Some("signalfd"),
    /* 322 */ Some("timerfd_create"),
    /* 323 */ Some("eventfd"),
    /* 324 */ Some("fallocate"),
    /* 325 */ Some("timerfd_settime"),
    /* 326 */ Some("timerfd_gettime"),
    /* 327 */ Some("signalfd4"),
    /* 328 */ Some("eventfd2"),
    /* 329 */ Some("epoll_create1"),
    /* 330 */ Some("dup3"),
    /* 331 */ Some("pipe2"),
    /* 332 */ Some("inotify_init1"),
    /* 333 */ Some("preadv"),
    /* 334 */ Some("pwritev"),
    /* 335 */ Some("rt_tgsigqueueinfo"),
    /* 336 */ Some("perf_event_open"),
    /* 337 */ Some("recvmmsg"),
    /* 338 */ Some("fanotify_init"),
    /* 339 */ Some("fanotify_mark"),
    /* 340 */ Some("prlimit64"),
    /* 341 */ Some("name_to_handle_at"),
    /* 342 */ Some("open_by_handle_at"),
    /* 343 */ Some("clock_adjtime"),
    /* 344 */ Some("syncfs"),
    /* 345 */ Some("sendmmsg"),
    /* 346 */ Some("setns"),
    /* 347 */ Some("process_vm_readv"),
    /* 348 */ Some("process_vm_writev"),
    /* 349 */ Some("kcmp"),
    /* 350 */ Some("finit_module"),
    /* 351 */ Some("sched_setattr"),
    /* 352 */ Some("sched_getattr"),
    /* 353 */ Some("renameat2"),
    /* 354 */ Some("seccomp"),
    /* 355 */ Some("getrandom"),
    /* 356 */ Some("memfd_create"),
    /* 357 */ Some("bpf"),
    /* 358 */ Some("execveat"),
    /* 359 */ Some("socket"),
    /* 360 */ Some("socketpair"),
    /* 361 */ Some("bind"),
    /* 362 */ Some("connect"),
    /* 363 */ Some("listen"),
    /* 364 */ Some("accept4"),
    /* 365 */ Some("getsockopt"),
    /* 366 */ Some("setsockopt"),
    /* 367 */ Some("getsockname"),
    /* 368 */ Some("getpeername"),
    /* 369 */ Some("sendto"),
    /* 370 */ Some("sendmsg"),
    /* 371 */ Some("recvfrom"),
    /* 372 */ Some("recvmsg"),
    /* 373 */ Some("shutdown"),
    /* 374 */ Some("userfaultfd"),
    /* 375 */ Some("membarrier"),
    /* 376 */ Some("mlock2"),
    /* 377 */ Some("copy_file_range"),
    /* 378 */ Some("preadv2"),
    /* 379 */ Some("pwritev2"),
    /* 380 */ Some("pkey_mprotect"),
    /* 381 */ Some("pkey_alloc"),
    /* 382 */ Some("pkey_free"),
    /* 383 */ Some("statx"),
    /* 384 */ Some("arch_prctl"),
    /* 385 */ Some("io_pgetevents"),
    /* 386 */ Some("rseq"),
    /* 387 */ None,
    /* 388 */ None,
    /* 389 */ None,
    /* 390 */ None,
    /* 391 */ None,
    /* 392 */ None,
    /* 393 */ Some("semget"),
    /* 394 */ Some("semctl"),
    /* 395 */ Some("shmget"),
    /* 396 */ Some("shmctl"),
    /* 397 */ Some("shmat"),
    /* 398 */ Some("shmdt"),
    /* 399 */ Some("msgget"),
    /* 400 */ Some("msgsnd"),
    /* 401 */ Some("msgrcv"),
    /* 402 */ Some("msgctl"),
    /* 403 */ Some("clock_gettime64"),
    /* 404 */ Some("clock_settime64"),
    /* 405 */ Some("clock_adjtime64"),
    /* 406 */ Some("clock_getres_time64"),
    /* 407 */ Some("clock_nanosleep_time64"),
    /* 408 */ Some("timer_gettime64"),
    /* 409 */ Some("timer_settime64"),
    /* 410 */ Some("timerfd_gettime64"),
    /* 411 */ Some("timerfd_settime64"),
    /* 412 */ Some("utimensat_time64"),
    /* 413 */ Some("pselect6_time64"),
    /* 414 */ Some("ppoll_time64"),
    /* 415 */ None,
    /* 416 */ Some("io_pgetevents_time64"),
    /* 417 */ Some("recvmmsg_time64"),
    /* 418 */ Some("mq_timedsend_time64"),
    /* 419 */ Some("mq_timedreceive_time64"),
    /* 420 */ Some("semtimedop_time64"),
    /* 421 */ Some("rt_sigtimedwait_time64"),
    /* 422 */ Some("futex_time64"),
    /* 423 */ Some("sched_rr_get_interval_time64"),
    /* 424 */ Some("pidfd_send_signal"),
    /* 425 */ Some("io_uring_setup"),
    /* 426 */ Some("io_uring_enter"),
    /* 427 */ Some("io_uring_register"),
    /* 428 */ Some("open_tree"),
    /* 429 */ Some("move_mount"),
    /* 430 */ Some("fsopen"),
    /* 431 */ Some("fsconfig"),
    /* 432 */ Some("fsmount"),
    /* 433 */ Some("fspick"),
    /* 434 */ Some("pidfd_open"),
    /* 435 */ Some("clone3"),
    /* 436 */ Some("close_range"),
    /* 437 */ Some("openat2"),
    /* 438 */ Some("pidfd_getfd"),
    /* 439 */ Some("faccessat2"),
    /* 440 */ Some("process_madvise"),
    /* 441 */ Some("epoll_pwait2"),
    /* 442 */ Some("mount_setattr"),
    /* 443 */ Some("quotactl_fd"),
    /* 444 */ Some("landlock_create_ruleset"),
    /* 445 */ Some("landlock_add_rule"),
    /* 446 */ Some("landlock_restrict_self"),
    /* 447 */ Some("memfd_secret"),
    /* 448 */ Some("process_mrelease"),
    /* 449 */ Some("futex_waitv"),
    /* 450 */ Some("set_mempolicy_home_node"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_known_numbers() {
        for (nr, name) in [
            (0, "read"),
            (1, "write"),
            (2, "open"),
            (3, "close"),
            (9, "mmap"),
            (39, "getpid"),
            (56, "clone"),
            (59, "execve"),
            (60, "exit"),
            (62, "kill"),
            (101, "ptrace"),
            (134, "uselib"),
            (156, "_sysctl"),
            (169, "reboot"),
            (175, "init_module"),
            (231, "exit_group"),
            (257, "openat"),
            (313, "finit_module"),
            (321, "bpf"),
            (334, "rseq"),
            (424, "pidfd_send_signal"),
            (435, "clone3"),
            (450, "set_mempolicy_home_node"),
        ] {
            assert_eq!(syscall_name(nr), Some(name), "{nr}");
            assert_eq!(syscall_number(name), Some(nr), "{name}");
        }
        // The gap, past the end, the x32 range.
        for nr in [335, 400, 423, 451, 512, 547, u64::MAX] {
            assert_eq!(syscall_name(nr), None, "{nr}");
        }
        assert_eq!(syscall_number("compat_sys_execve"), None);
        assert_eq!(SYSCALL_COUNT, 451);

        // i386, a table of its own.
        for (nr, name) in [
            (0, "restart_syscall"),
            (1, "exit"),
            (3, "read"),
            (4, "write"),
            (11, "execve"),
            (17, "break"),
            (102, "socketcall"),
            (243, "set_thread_area"),
            (383, "statx"),
            (450, "set_mempolicy_home_node"),
        ] {
            assert_eq!(syscall_name_i386(nr), Some(name), "{nr}");
        }
        for nr in [222, 223, 251, 285, 387, 392, 415, 451, u64::MAX] {
            assert_eq!(syscall_name_i386(nr), None, "{nr}");
        }
        assert_eq!(NAMES_I386.iter().flatten().count(), 440);
        // i386-only names are filter names too.
        assert!(SyscallFilter::parse("socketcall").is_ok());
        assert_eq!(NAMES.iter().flatten().count(), 451 - (424 - 335));
    }

    fn regs(nr: u64, cr3: u64) -> SyscallRegs {
        SyscallRegs {
            entry: SyscallEntry::Syscall,
            rax: nr,
            rdi: 1,
            rsi: 0x7ffd_0000_1000,
            rdx: 13,
            r10: 4,
            r8: 5,
            r9: 6,
            rcx: 0x40_1234,
            rsp: 0x7ffd_0000_2000,
            cr3,
            ..Default::default()
        }
    }

    /// Guest memory: little-endian bytes from `base`; nothing elsewhere.
    struct Stack {
        base: u64,
        bytes: Vec<u8>,
    }

    impl GuestRead for Stack {
        fn read<const N: usize>(&self, vaddr: u64) -> Option<[u8; N]> {
            let at = usize::try_from(vaddr.checked_sub(self.base)?).ok()?;
            self.bytes.get(at..at + N)?.try_into().ok()
        }
    }

    fn no_memory() -> Stack {
        Stack {
            base: 0,
            bytes: Vec::new(),
        }
    }

    #[test]
    fn decodes_and_writes_json_lines() {
        let r = SyscallRecord::decode(1, &regs(1, 0x1234_5000), &no_memory());
        assert_eq!(r.name, Some("write"));
        assert_eq!(r.args, [1, 0x7ffd_0000_1000, 13, 4, 5, 6]);
        let line = r.to_json_line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "vcpu": 1, "nr": 1, "name": "write",
                "args": ["0x1", "0x7ffd00001000", "0xd", "0x4", "0x5", "0x6"],
                "cr3": "0x12345000", "return_rip": "0x401234", "entry": "syscall",
                "ret": null,
            })
        );
        let unknown = SyscallRecord::decode(0, &regs(999, 0), &no_memory());
        assert_eq!(unknown.name, None);
        assert!(unknown.to_json().contains("\"name\":null"));
    }

    /// The i386 entries: 32-bit number and arguments, their return point (and
    /// sysenter's sixth argument) from the caller's stack.
    #[test]
    fn decodes_the_i386_entries() {
        let stack = Stack {
            base: 0x8000,
            bytes: [
                &0x40_2000u64.to_le_bytes()[..], // int80 frame: RIP
                &0x08u64.to_le_bytes(),          // CS
                &0x246u64.to_le_bytes(),         // RFLAGS
                &0x9000u64.to_le_bytes(),        // RSP
                &0xaaaa_0006u32.to_le_bytes(),   // sysenter: [EBP], the sixth argument
                &0u32.to_le_bytes(),             // EDX
                &0u32.to_le_bytes(),             // ECX
                &0x40_3000u32.to_le_bytes(),     // the return address
            ]
            .concat(),
        };
        let high = 0xffff_ffff_0000_0000;
        let mut r = SyscallRegs {
            entry: SyscallEntry::Int80,
            rax: high | 4,
            rbx: high | 1,
            rcx: 2,
            rdx: 3,
            rsi: 4,
            rdi: 5,
            rbp: 6,
            rsp: 0x8000,
            cr3: 0x1000,
            ..Default::default()
        };
        let c = SyscallRecord::decode(0, &r, &stack);
        assert_eq!(
            (c.nr, c.name, c.args),
            (4, Some("write"), [1, 2, 3, 4, 5, 6])
        );
        assert_eq!(c.return_rip, Some(0x40_2000));
        assert_eq!(
            SyscallEntry::Int80.return_point(&r, &stack),
            Some(ReturnPoint {
                rip: 0x40_2000,
                rsp: 0x9000
            })
        );
        assert_eq!(SyscallEntry::Int80.result(high | 0x2a), 0x2a);
        assert!(SyscallFilter::all().with_numbers([4]).matches(&r));
        // A name stands for its number in the call's own ABI.
        assert!(SyscallFilter::parse("write").unwrap().matches(&r));
        assert!(!SyscallFilter::parse("stat").unwrap().matches(&r));

        r.entry = SyscallEntry::Sysenter;
        r.rbp = 0x8020;
        let c = SyscallRecord::decode(0, &r, &stack);
        assert_eq!(c.args, [1, 2, 3, 4, 5, 0xaaaa_0006]);
        assert_eq!(
            SyscallEntry::Sysenter.return_point(&r, &stack),
            Some(ReturnPoint {
                rip: 0x40_3000,
                rsp: 0x8030
            })
        );
        assert!(c.to_json().contains(r#""entry":"sysenter""#));

        // A stack that does not translate: no return point, the argument 0.
        r.rbp = 0x1_0000;
        let c = SyscallRecord::decode(0, &r, &stack);
        assert_eq!((c.args[5], c.return_rip), (0, None));
        r.entry = SyscallEntry::Int80;
        r.rsp = 0x1_0000;
        assert_eq!(SyscallEntry::Int80.return_point(&r, &stack), None);
    }

    #[test]
    fn filters() {
        let all = SyscallFilter::parse("").unwrap();
        assert_eq!(all, SyscallFilter::all());
        assert!(all.matches(&regs(12345, 7)));

        let f = SyscallFilter::parse(" read, write ,59,0x3c,,999").unwrap();
        assert_eq!(
            f.numbers().iter().copied().collect::<Vec<_>>(),
            vec![59, 60, 999]
        );
        assert_eq!(
            f.names().iter().copied().collect::<Vec<_>>(),
            vec!["read", "write"]
        );
        assert!(f.matches(&regs(0, 1)) && f.matches(&regs(60, 2)) && f.matches(&regs(999, 3)));
        assert!(!f.matches(&regs(2, 1)));

        let f = SyscallFilter::parse("openat,cr3=0x1234000").unwrap();
        assert_eq!(f.cr3(), Some(0x123_4000));
        assert!(f.matches(&regs(257, 0x123_4000)));
        // The same process under another PCID, or with the no-flush bit.
        assert!(f.matches(&regs(257, 0x123_4005 | 1 << 63)));
        assert!(!f.matches(&regs(257, 0x123_5000)));
        assert!(!f.matches(&regs(0, 0x123_4000)));
        assert!(SyscallFilter::parse("cr3=abc000")
            .unwrap()
            .matches(&regs(5, 0xabc000)));

        assert_eq!(
            SyscallFilter::parse("read,frobnicate"),
            Err(FilterError::UnknownName("frobnicate".into()))
        );
        let e = SyscallFilter::parse("read,frobnicate").unwrap_err();
        assert!(e.to_string().contains("frobnicate"), "{e}");
        assert_eq!(
            SyscallFilter::parse("12abc"),
            Err(FilterError::UnknownName("12abc".into()))
        );
        assert_eq!(
            SyscallFilter::parse("cr3=zz"),
            Err(FilterError::BadCr3("zz".into()))
        );
        assert_eq!(
            SyscallFilter::parse("cr3=1,cr3=2"),
            Err(FilterError::Cr3Twice)
        );
        let built = SyscallFilter::all().with_numbers([59]).with_cr3(0x1000);
        assert!(built.matches(&regs(59, 0x1000)) && !built.matches(&regs(60, 0x1000)));
    }
}
