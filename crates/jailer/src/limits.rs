//! `--resource-limit RESOURCE=VALUE`: the VMM's rlimits, soft and hard alike, set on
//! the jailer before it becomes the VMM (raising a hard limit needs root).

use anyhow::{bail, Context};

/// The resources, by their flag names (Firecracker's `fsize` and `no-file`, and
/// more), and what they limit.
const RESOURCES: [(&str, libc::__rlimit_resource_t); 6] = [
    ("fsize", libc::RLIMIT_FSIZE),
    ("no-file", libc::RLIMIT_NOFILE),
    ("nproc", libc::RLIMIT_NPROC),
    ("as", libc::RLIMIT_AS),
    ("memlock", libc::RLIMIT_MEMLOCK),
    ("core", libc::RLIMIT_CORE),
];

/// The file descriptors the VMM may have when no `no-file` is given (Firecracker's
/// default).
const DEFAULT_NO_FILE: u64 = 2048;

/// One limit to set.
#[derive(Debug, PartialEq)]
pub struct Limit {
    /// As given, for messages (`no-file=2048` for the default).
    arg: String,
    resource: libc::__rlimit_resource_t,
    value: libc::rlim_t,
}

/// Parses every `--resource-limit`, adding the default `no-file`.
pub fn parse(args: &[String]) -> anyhow::Result<Vec<Limit>> {
    let mut limits: Vec<Limit> = args
        .iter()
        .map(|a| parse_one(a))
        .collect::<anyhow::Result<_>>()?;
    if !limits.iter().any(|l| l.resource == libc::RLIMIT_NOFILE) {
        limits.push(parse_one(&format!("no-file={DEFAULT_NO_FILE}"))?);
    }
    Ok(limits)
}

fn parse_one(arg: &str) -> anyhow::Result<Limit> {
    let names = || RESOURCES.map(|(n, _)| n).join(", ");
    let (name, value) = arg.split_once('=').with_context(|| {
        format!(
            "--resource-limit {arg:?}: not RESOURCE=VALUE (such as no-file=1024; resources: {})",
            names()
        )
    })?;
    let Some(&(_, resource)) = RESOURCES.iter().find(|(n, _)| *n == name) else {
        bail!(
            "--resource-limit {arg:?}: {name:?} is not one of {}",
            names()
        );
    };
    let value = match value {
        "unlimited" => libc::RLIM_INFINITY,
        n => n.parse().map_err(|_| {
            anyhow::anyhow!("--resource-limit {arg:?}: {n:?} is neither a number nor unlimited")
        })?,
    };
    Ok(Limit {
        arg: arg.into(),
        resource,
        value,
    })
}

/// Sets the limits on this process (the VMM inherits them).
pub fn apply(limits: &[Limit]) -> anyhow::Result<()> {
    for l in limits {
        let rlimit = libc::rlimit {
            rlim_cur: l.value,
            rlim_max: l.value,
        };
        // SAFETY: setrlimit reads the one rlimit it is given, which lives across the call.
        if unsafe { libc::setrlimit(l.resource, &rlimit) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("--resource-limit {}: cannot set it", l.arg));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let l = parse(&[
            "fsize=250000000".into(),
            "core=0".into(),
            "as=unlimited".into(),
        ])
        .unwrap();
        let got: Vec<_> = l.iter().map(|l| (l.resource, l.value)).collect();
        assert_eq!(
            got,
            [
                (libc::RLIMIT_FSIZE, 250_000_000),
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_AS, libc::RLIM_INFINITY),
                (libc::RLIMIT_NOFILE, DEFAULT_NO_FILE),
            ]
        );
        let l = parse(&["no-file=64".into()]).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].value, 64);
        for (bad, why) in [
            ("no-file", "not RESOURCE=VALUE"),
            (
                "nofile=1",
                "\"nofile\" is not one of fsize, no-file, nproc, as, memlock, core",
            ),
            ("fsize=-1", "\"-1\" is neither a number nor unlimited"),
            ("fsize=", "\"\" is neither a number nor unlimited"),
        ] {
            let e = parse(&[bad.into()]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--resource-limit {bad:?}: ")), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
