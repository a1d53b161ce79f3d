//! Host topology: packages, NUMA nodes, cores, hardware threads (PUs), network interfaces and
//! GPUs.
//!
//! [`discover`] asks hwloc (through `hwlocality`); where hwloc fails it logs one warning (target
//! `braid::topo`) and falls back to [`discover_sysfs`], which reads `/sys/devices/system/node`,
//! `/proc/cpuinfo`, `/sys/class/net` and `/sys/bus/pci/devices`. Neither ever panics: what
//! cannot be read is left out (or counted as the smallest sensible value).
//!
//! The host id ([`crate::membership::local_host_id`]) groups ranks per host so that shared
//! memory is used inside a host.
//!
//! This module calls `sched_getcpu`/`sched_setaffinity` through `libc` (FFI); each `unsafe`
//! block names its invariant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

const TARGET: &str = "braid::topo";

/// Where a [`Topology`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// hwloc, through `hwlocality`.
    Hwloc,
    /// The sysfs/procfs fallback ([`discover_sysfs`]).
    Sysfs,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// OS index of the node (`nodeN` in sysfs).
    pub os_index: u32,
    /// Local memory of the node in bytes (0 where unknown).
    pub memory_bytes: u64,
    /// OS indices of the PUs (hardware threads) of the node, ascending.
    pub cpus: Vec<u32>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// Interface name (`eth0`, `ib0`, ...).
    pub name: String,
    /// PCI bus id (`dddd:bb:dd.f`) of the device behind the interface, where known.
    pub pci_bus_id: Option<String>,
    /// Link speed in Mbit/s (`/sys/class/net/<if>/speed`), where known.
    pub speed_mbps: Option<u64>,
}

/// One GPU (a PCI device of class `0x03xx`, display controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// PCI bus id (`dddd:bb:dd.f`).
    pub pci_bus_id: String,
    /// PCI vendor id (`0x10de` NVIDIA, `0x1002` AMD, ...).
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// PCI class id (`0x0300` VGA, `0x0302` 3D controller, ...).
    pub class_id: u16,
    /// Marketing name where hwloc knows it.
    pub name: Option<String>,
}

/// What was found on this host. Serialises to JSON (`braid-perf topo --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Host name.
    pub hostname: String,
    /// Host id ([`crate::membership::local_host_id`]).
    pub host_id: String,
    /// Number of processor packages (sockets), at least 1.
    pub packages: u32,
    /// NUMA nodes (at least one).
    pub numa_nodes: Vec<NumaNode>,
    /// Number of physical cores, at least 1.
    pub cores: u32,
    /// Number of PUs (hardware threads), at least 1.
    pub pus: u32,
    /// Network interfaces (loopback left out).
    pub nics: Vec<NetInterface>,
    /// GPUs (empty where none).
    pub gpus: Vec<Gpu>,
    /// How this was discovered.
    pub source: Source,
}

/// Discovers this host's topology through hwloc; on any hwloc failure logs one warning and
/// returns [`discover_sysfs`]'s answer instead. Never panics.
pub fn discover() -> Topology {
    let attempt = std::panic::catch_unwind(discover_hwloc);
    match attempt {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(target: TARGET, "hwloc discovery failed ({e}); using sysfs/procfs");
            discover_sysfs()
        }
        Err(_) => {
            tracing::warn!(target: TARGET, "hwloc discovery panicked; using sysfs/procfs");
            discover_sysfs()
        }
    }
}

fn pci_bus_id(domain: u32, bus: u8, dev: u8, func: u8) -> String {
    format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}")
}

fn discover_hwloc() -> Result<Topology, String> {
    use hwlocality::object::attributes::ObjectAttributes;
    use hwlocality::object::types::{OSDeviceType, ObjectType};
    use hwlocality::topology::builder::TypeFilter;

    let topo = hwlocality::Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| format!("io type filter: {e}"))?
        .build()
        .map_err(|e| format!("topology load: {e}"))?;

    let count = |t: ObjectType| u32::try_from(topo.objects_with_type(t).count()).unwrap_or(0);
    let pus = count(ObjectType::PU);
    if pus == 0 {
        return Err("hwloc found no PUs".into());
    }
    let cores = count(ObjectType::Core).max(1);
    let packages = count(ObjectType::Package).max(1);

    let mut numa_nodes = Vec::new();
    for n in topo.objects_with_type(ObjectType::NUMANode) {
        let memory_bytes = match n.attributes() {
            Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
            _ => 0,
        };
        let cpus = n
            .cpuset()
            .map(|s| {
                s.iter_set()
                    .filter_map(|i| u32::try_from(usize::from(i)).ok())
                    .collect()
            })
            .unwrap_or_default();
        numa_nodes.push(NumaNode {
            os_index: n
                .os_index()
                .and_then(|i| u32::try_from(i).ok())
                .unwrap_or(0),
            memory_bytes,
            cpus,
        });
    }
    if numa_nodes.is_empty() {
        numa_nodes = sysfs_numa_nodes();
    }

    // Interfaces come from /sys/class/net (hwloc only sees those backed by a device); hwloc adds
    // the PCI bus id where sysfs could not tell it.
    let mut nics = sysfs_nics();
    for osdev in topo.os_devices() {
        let is_net = matches!(
            osdev.attributes(),
            Some(ObjectAttributes::OSDevice(a)) if a.device_type() == OSDeviceType::Network
        );
        let Some(name) = osdev.name().and_then(|n| n.to_str().ok()) else {
            continue;
        };
        if !is_net {
            continue;
        }
        let bus = osdev.parent().and_then(|p| match p.attributes() {
            Some(ObjectAttributes::PCIDevice(a)) => Some(pci_bus_id(
                u32::from(a.domain()),
                a.bus_id(),
                a.bus_device(),
                a.function(),
            )),
            _ => None,
        });
        match nics.iter_mut().find(|n| n.name == name) {
            Some(n) => {
                if n.pci_bus_id.is_none() {
                    n.pci_bus_id = bus;
                }
            }
            None => nics.push(NetInterface {
                name: name.to_string(),
                pci_bus_id: bus,
                speed_mbps: read_speed(name),
            }),
        }
    }

    let mut gpus = Vec::new();
    for pci in topo.pci_devices() {
        let Some(ObjectAttributes::PCIDevice(a)) = pci.attributes() else {
            continue;
        };
        if a.class_id() >> 8 != 0x03 {
            continue;
        }
        let name = pci
            .infos()
            .iter()
            .find(|i| i.name().to_bytes() == b"PCIDevice")
            .and_then(|i| i.value().to_str().ok())
            .map(str::to_string);
        gpus.push(Gpu {
            pci_bus_id: pci_bus_id(
                u32::from(a.domain()),
                a.bus_id(),
                a.bus_device(),
                a.function(),
            ),
            vendor_id: a.vendor_id(),
            device_id: a.device_id(),
            class_id: a.class_id(),
            name,
        });
    }

    Ok(Topology {
        hostname: crate::membership::local_hostname(),
        host_id: crate::membership::local_host_id(),
        packages,
        numa_nodes,
        cores,
        pus,
        nics,
        gpus,
        source: Source::Hwloc,
    })
}

/// Discovers this host's topology from sysfs and procfs only (`/sys/devices/system/node`,
/// `/proc/cpuinfo`, `/sys/class/net`, `/sys/bus/pci/devices`); what [`discover`] falls back
/// to. Never panics; counts are at least 1 and there is at least one NUMA node.
pub fn discover_sysfs() -> Topology {
    let (packages, cores, pus) = cpuinfo_counts(
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        available_cpus(),
    );
    Topology {
        hostname: crate::membership::local_hostname(),
        host_id: crate::membership::local_host_id(),
        packages,
        numa_nodes: sysfs_numa_nodes(),
        cores,
        pus,
        nics: sysfs_nics(),
        gpus: sysfs_gpus(),
        source: Source::Sysfs,
    }
}

fn available_cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

/// (packages, cores, PUs) from the text of `/proc/cpuinfo`; `fallback_pus` where it lists no
/// processor. Without `physical id`/`core id` lines every PU counts as a core of one package.
fn cpuinfo_counts(cpuinfo: &str, fallback_pus: u32) -> (u32, u32, u32) {
    let mut pus = 0u32;
    let mut pkgs = BTreeSet::new();
    let mut cores = BTreeSet::new();
    let mut pkg: Option<String> = None;
    for line in cpuinfo.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "processor" => {
                pus += 1;
                pkg = None;
            }
            "physical id" => {
                let p = v.trim().to_string();
                pkgs.insert(p.clone());
                pkg = Some(p);
            }
            "core id" => {
                cores.insert((pkg.clone().unwrap_or_default(), v.trim().to_string()));
            }
            _ => {}
        }
    }
    let pus = if pus == 0 { fallback_pus.max(1) } else { pus };
    let n = |s: usize| u32::try_from(s).unwrap_or(u32::MAX);
    let packages = n(pkgs.len()).max(1);
    let cores = if cores.is_empty() {
        pus
    } else {
        n(cores.len()).min(pus)
    };
    (packages, cores.max(1), pus)
}

/// Parses a kernel CPU list (`"0-3,8,10-11"`) into ascending CPU numbers; `None` for a
/// malformed list. An empty (or all-blank) list gives an empty vector.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().ok()?;
                let b: u32 = b.trim().parse().ok()?;
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out.into_iter().collect())
}

fn sysfs_numa_nodes() -> Vec<NumaNode> {
    let mut nodes = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(idx) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let p = e.path();
            let cpus = std::fs::read_to_string(p.join("cpulist"))
                .ok()
                .and_then(|s| parse_cpu_list(&s))
                .unwrap_or_default();
            let memory_bytes = std::fs::read_to_string(p.join("meminfo"))
                .ok()
                .and_then(|s| meminfo_total(&s))
                .unwrap_or(0);
            nodes.insert(
                idx,
                NumaNode {
                    os_index: idx,
                    memory_bytes,
                    cpus,
                },
            );
        }
    }
    if nodes.is_empty() {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| meminfo_total(&s))
            .unwrap_or(0);
        return vec![NumaNode {
            os_index: 0,
            memory_bytes,
            cpus: (0..available_cpus()).collect(),
        }];
    }
    nodes.into_values().collect()
}

/// `MemTotal` in bytes from `/proc/meminfo` or a node's `meminfo` (`Node 0 MemTotal: N kB`).
fn meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.contains("MemTotal:"))?;
    let (_, rest) = line.split_once("MemTotal:")?;
    let mut it = rest.split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    Some(match it.next() {
        Some("kB") => n.saturating_mul(1024),
        _ => n,
    })
}

/// Link speed of `name` in Mbit/s; `None` where unknown (down links report -1 or fail).
fn read_speed(name: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("speed"))
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v > 0)
}

fn is_pci_address(s: &str) -> bool {
    // dddd:bb:dd.f
    let b = s.as_bytes();
    b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.'
}

fn sysfs_nics() -> Vec<NetInterface> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name == "lo" {
            continue;
        }
        let pci_bus_id = std::fs::canonicalize(e.path().join("device"))
            .ok()
            .and_then(|p| p.file_name().and_then(|f| f.to_str()).map(str::to_string))
            .filter(|f| is_pci_address(f));
        out.push(NetInterface {
            speed_mbps: read_speed(&name),
            name,
            pci_bus_id,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn read_hex_u16(p: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(p).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn sysfs_gpus() -> Vec<Gpu> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(bus) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let p = e.path();
        // `class` is 24 bits: class, subclass, programming interface.
        let Some(class) = read_hex_u16(&p.join("class")) else {
            continue;
        };
        if class >> 16 != 0x03 {
            continue;
        }
        let vendor_id = read_hex_u16(&p.join("vendor"))
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(0);
        let device_id = read_hex_u16(&p.join("device"))
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(0);
        out.push(Gpu {
            pci_bus_id: bus,
            vendor_id,
            device_id,
            class_id: u16::try_from(class >> 8).unwrap_or(0),
            name: None,
        });
    }
    out.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
    out
}

/// The NUMA node of the CPU the calling thread runs on right now (`sched_getcpu(3)`, then
/// `/sys/devices/system/cpu/cpuN/nodeM`). `None` where either is unavailable. The answer may
/// be stale as soon as it is returned unless the thread is pinned.
pub fn local_numa_node() -> Option<u32> {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours; it returns -1
    // on failure, which is handled below.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = u32::try_from(cpu).ok()?;
    numa_node_of_cpu(cpu)
}

/// Pins the calling thread to `cpus` (`sched_setaffinity(2)`); what `BRAID_CPU_AFFINITY` does
/// to a communicator's progress thread. CPUs at or above `CPU_SETSIZE` are ignored. Returns
/// whether the kernel accepted the mask; on failure (no such CPU online, not allowed by the
/// cgroup) it logs one warning and leaves the affinity as it was.
pub fn pin_current_thread(cpus: &[u32]) -> bool {
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &c in cpus {
        let c = c as usize;
        if c < max {
            // SAFETY: `c` is below the bit capacity of `set`, which is a valid cpu_set_t.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed, and
    // the kernel only reads it.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        tracing::warn!(
            target: TARGET,
            "cannot pin thread to CPUs {}: {}",
            format_cpu_list(cpus),
            std::io::Error::last_os_error()
        );
        return false;
    }
    tracing::debug!(target: TARGET, "thread pinned to CPUs {}", format_cpu_list(cpus));
    true
}

/// The NUMA node of CPU `cpu` from `/sys/devices/system/cpu/cpu<cpu>/node<M>`.
fn numa_node_of_cpu(cpu: u32) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}")).ok()?;
    dir.flatten().find_map(|e| {
        e.file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse().ok())
    })
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let src = match self.source {
            Source::Hwloc => "hwloc",
            Source::Sysfs => "sysfs",
        };
        writeln!(f, "host      {} (id {})", self.hostname, self.host_id)?;
        writeln!(f, "source    {src}")?;
        writeln!(
            f,
            "cpus      {} package(s), {} core(s), {} PU(s)",
            self.packages, self.cores, self.pus
        )?;
        for n in &self.numa_nodes {
            writeln!(
                f,
                "numa      node{}: {:.1} GiB, cpus {}",
                n.os_index,
                n.memory_bytes as f64 / f64::from(1u32 << 30),
                format_cpu_list(&n.cpus)
            )?;
        }
        if self.nics.is_empty() {
            writeln!(f, "nic       (none)")?;
        }
        for n in &self.nics {
            writeln!(
                f,
                "nic       {} pci {} speed {}",
                n.name,
                n.pci_bus_id.as_deref().unwrap_or("-"),
                n.speed_mbps
                    .map_or_else(|| "-".to_string(), |s| format!("{s} Mb/s"))
            )?;
        }
        if self.gpus.is_empty() {
            writeln!(f, "gpu       (none)")?;
        }
        for g in &self.gpus {
            writeln!(
                f,
                "gpu       {} vendor {:04x} device {:04x} class {:04x}{}",
                g.pci_bus_id,
                g.vendor_id,
                g.device_id,
                g.class_id,
                g.name
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

/// Formats ascending CPU numbers as a kernel CPU list (`0-3,8`).
fn format_cpu_list(cpus: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(",")
    }
}

/// Number of NUMA nodes the kernel reports (1 where unknown).
pub fn numa_node_count() -> usize {
    std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.starts_with("node") && n[4..].parse::<u32>().is_ok()
                })
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// CPUs of the calling thread's NUMA node (from sysfs), where known.
pub fn local_numa_cpus() -> Option<Vec<u32>> {
    let node = local_numa_node()?;
    let list =
        std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist")).ok()?;
    parse_cpu_list(&list).filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn numa_helpers_agree_with_sysfs() {
        let n = numa_node_count();
        assert!(n >= 1);
        if let Some(cpus) = local_numa_cpus() {
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = unsafe { libc::sched_getcpu() };
            assert!(
                cpu < 0 || cpus.contains(&(cpu as u32)) || n > 1,
                "{cpu} not in {cpus:?}"
            );
        }
    }

    use super::*;

    fn sane(t: &Topology) {
        assert!(t.pus >= 1, "{t:?}");
        assert!(t.cores >= 1 && t.cores <= t.pus, "{t:?}");
        assert!(t.packages >= 1, "{t:?}");
        assert!(!t.numa_nodes.is_empty(), "{t:?}");
        assert!(!t.hostname.is_empty());
        assert_eq!(t.host_id, crate::membership::local_host_id());
    }

    #[test]
    fn discover_finds_cpus() {
        let t = discover();
        sane(&t);
    }

    #[test]
    fn sysfs_fallback_alone_works() {
        let t = discover_sysfs();
        assert_eq!(t.source, Source::Sysfs);
        sane(&t);
    }

    #[test]
    fn json_round_trips() {
        for t in [discover(), discover_sysfs()] {
            let s = serde_json::to_string(&t).unwrap();
            let back: Topology = serde_json::from_str(&s).unwrap();
            assert_eq!(back, t);
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert!(v["source"] == "hwloc" || v["source"] == "sysfs", "{v}");
        }
    }

    #[test]
    fn display_mentions_counts() {
        let t = discover_sysfs();
        let s = t.to_string();
        assert!(s.contains(&format!("{} PU(s)", t.pus)), "{s}");
    }

    #[test]
    fn cpuinfo_parsing() {
        let two_by_two = "processor : 0\nphysical id : 0\ncore id : 0\n\n\
                          processor : 1\nphysical id : 0\ncore id : 0\n\n\
                          processor : 2\nphysical id : 1\ncore id : 0\n\n\
                          processor : 3\nphysical id : 1\ncore id : 1\n";
        assert_eq!(cpuinfo_counts(two_by_two, 1), (2, 3, 4));
        assert_eq!(
            cpuinfo_counts("processor : 0\nprocessor : 1\n", 1),
            (1, 2, 2)
        );
        assert_eq!(cpuinfo_counts("", 3), (1, 3, 3));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8"), Some(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpu_list(" 5 , 1-2\n"), Some(vec![1, 2, 5]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            meminfo_total("Node 0 MemTotal:       1024 kB\n"),
            Some(1 << 20)
        );
        assert_eq!(meminfo_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn pinning_a_thread() {
        std::thread::spawn(|| {
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = u32::try_from(unsafe { libc::sched_getcpu() }).unwrap();
            assert!(pin_current_thread(&[cpu]));
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getcpu() }, cpu as i32);
            assert!(!pin_current_thread(&[]));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn local_numa_node_is_a_known_node() {
        if let Some(n) = local_numa_node() {
            let t = discover_sysfs();
            assert!(t.numa_nodes.iter().any(|x| x.os_index == n), "{n} {t:?}");
        }
    }
}
