"""A seccomp-BPF filter for sandboxed programs, built with ctypes (no libseccomp needed).

An sklearn program never needs the kernel keyring, ptrace, kernel modules, kexec, eBPF,
perf events, io_uring, mounts or new namespaces. :func:`install_filter` makes those system
calls fail with ``EPERM`` for the calling process and everything it starts (a seccomp
filter is inherited and cannot be removed). The list follows what Docker's default profile
denies to a container without extra capabilities (``moby/profiles/seccomp/default.json``),
which already runs the scientific Python stack:

* ``clone3`` fails with ``ENOSYS`` (as in Docker), so glibc falls back to ``clone``, whose
  flags a classic BPF filter *can* inspect: ``clone`` with any ``CLONE_NEW*`` flag is denied;
* ``personality`` is allowed only with the values Docker allows;
* on x86_64, x32-ABI numbers and any other architecture (``int 0x80``) are denied outright.

Why not a dependency: pyseccomp (the ctypes wrapper of libseccomp) has had no release since
2021 and needs ``libseccomp.so.2`` on the machine; the filter below is ~150 BPF instructions
written once per child, which costs microseconds. Only x86_64 and aarch64 have syscall tables
here; elsewhere :func:`seccomp_supported` says why and the sandbox runs without the filter.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

#: What is denied, by name. Grouped as in Docker's default profile.
DENIED_SYSCALLS: tuple[str, ...] = (
    # the kernel keyring: keys outlive the process and can be shared between programs
    "add_key", "request_key", "keyctl",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # the kernel itself: modules, kexec, eBPF, perf events, userfaultfd, io_uring
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
    "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init", "lookup_dcookie",
    # mounts and namespaces (set up before the filter is installed; never again afterwards)
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "name_to_handle_at", "open_by_handle_at",
    # machine-wide state
    "acct", "swapon", "swapoff", "reboot", "sethostname", "setdomainname", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "quotactl", "quotactl_fd", "nfsservctl",
    "iopl", "ioperm", "uselib", "ustat", "sysfs", "_sysctl",
    # NUMA policy of shared memory (Docker: only with CAP_SYS_NICE)
    "mbind", "get_mempolicy", "set_mempolicy", "migrate_pages", "move_pages",
)  # fmt: skip

# Syscall numbers, checked against <asm/unistd_64.h> and <asm-generic/unistd.h>.
_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "add_key": 248, "request_key": 249, "keyctl": 250, "kexec_load": 246, "kexec_file_load": 320,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "mount": 165, "umount2": 166,
    "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "acct": 163,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176, "get_kernel_syms": 177,
    "query_module": 178, "finit_module": 313, "quotactl": 179, "quotactl_fd": 443, "nfsservctl": 180,
    "lookup_dcookie": 212, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305,
    "adjtimex": 159, "uselib": 134, "ustat": 136, "sysfs": 139, "_sysctl": 156, "vhangup": 153,
    "syslog": 103, "name_to_handle_at": 303, "open_by_handle_at": 304, "mbind": 237, "get_mempolicy": 239,
    "set_mempolicy": 238, "migrate_pages": 256, "move_pages": 279, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "fanotify_init": 300,
    "clone": 56, "clone3": 435, "personality": 135,
}  # fmt: skip
_AARCH64 = {
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438,
    "add_key": 217, "request_key": 218, "keyctl": 219, "kexec_load": 104, "kexec_file_load": 294,
    "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "mount": 40, "umount2": 39, "pivot_root": 41,
    "chroot": 51, "unshare": 97, "setns": 268, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "acct": 89, "swapon": 224,
    "swapoff": 225, "reboot": 142, "sethostname": 161, "setdomainname": 162, "init_module": 105,
    "delete_module": 106, "finit_module": 273, "quotactl": 60, "quotactl_fd": 443, "nfsservctl": 42,
    "lookup_dcookie": 18, "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
    "vhangup": 58, "syslog": 116, "name_to_handle_at": 264, "open_by_handle_at": 265, "mbind": 235,
    "get_mempolicy": 236, "set_mempolicy": 237, "migrate_pages": 238, "move_pages": 239,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "fanotify_init": 262,
    "clone": 220, "clone3": 435, "personality": 92,
}  # fmt: skip
#: machine -> (AUDIT_ARCH_* value, syscall numbers)
ARCHES = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}

#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (CLONE_NEWTIME's bit
#: is part of the exit-signal field in clone()).
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
#: personality() values Docker allows: PER_LINUX, UNAME26 variants and the query 0xffffffff.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
X32_SYSCALL_BIT = 0x40000000
# classic BPF opcodes
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
# offsets in struct seccomp_data {int nr; __u32 arch; __u64 ip; __u64 args[6];} (little endian)
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_supported(machine: str | None = None) -> str | None:
    """``None`` if a filter can be built for this machine, else why not."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        return f"no syscall table for architecture {machine!r} (only {', '.join(ARCHES)})"
    if platform.system() != "Linux":
        return "seccomp needs Linux"
    return None


def build_filter(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The BPF program as ``(code, jt, jf, k)`` instructions."""
    machine = machine or platform.machine()
    audit_arch, numbers = ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, audit_arch),
        (_RET_K, 0, 0, deny),  # another ABI (i386 int 0x80 on x86_64): nothing allowed
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if machine == "x86_64":
        prog += [(_JGE_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, deny)]
    for nr in sorted({numbers[name] for name in DENIED_SYSCALLS if name in numbers}):
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, deny)]
    # clone3 passes its flags in memory, which BPF cannot read: ENOSYS makes glibc use clone.
    prog += [(_JEQ_K, 0, 1, numbers["clone3"]), (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    # personality(x): only the allowed values.
    block = [(_LD_W_ABS, 0, 0, _OFF_ARG0_LO)]
    n = len(ALLOWED_PERSONALITIES)
    for i, value in enumerate(ALLOWED_PERSONALITIES):
        block.append((_JEQ_K, n - i, 0, value))  # -> the ALLOW below
    block += [(_RET_K, 0, 0, deny), (_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    prog += [(_JEQ_K, 0, len(block), numbers["personality"]), *block]
    # clone(flags, ...): no new namespaces.
    prog += [
        (_JEQ_K, 0, 4, numbers["clone"]),
        (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
        (_JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS),
        (_RET_K, 0, 0, deny),
        (_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    prog.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return prog


_libc = ctypes.CDLL(None, use_errno=True)


def install_filter(machine: str | None = None) -> None:
    """Install the filter on the calling thread's process (needs ``PR_SET_NO_NEW_PRIVS``
    or CAP_SYS_ADMIN); ``OSError`` if the kernel refuses."""
    prog = build_filter(machine)
    array = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(array, ctypes.POINTER(_SockFilter)))
    result = _libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {errno.errorcode.get(err, err)}: {os.strerror(err)}")
