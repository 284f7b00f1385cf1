"""Hostile completions through `tas eval-code` (as `python -m engine.evals.code`), as root and as an ordinary
user: each attack of the sandbox audit (issue 23) must be contained, or the run refused, with nothing left
behind on the host.

As root the ordinary user is a system user made for the purpose (`tassbx`) and reached with setpriv; as
a non-root user the tests run as that user and skip the root-only ones. Each attack runs under both
sandbox backends (`sandbox`: builtin, and bwrap where bubblewrap is installed). The user runs the system Python
(/usr/bin/python3) on tiny-python (the HumanEval data lives in our venv, which it may not read).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from engine.evals.sandbox import ISOLATION
from engine.evals.sandbox_child import encode

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
USER = "tassbx"
TASK = "tiny-python/add_11"
RIGHT = "def add_11(x):\n    return x + 11\n"
WRONG = "def add_11(x):\n    return x\n"

pytestmark = pytest.mark.e2e


def _ordinary_user() -> tuple[int, int] | None:
    """(uid, gid) of the ordinary user the tests run `tas eval-code` as, creating it as root."""
    if not IS_ROOT:
        return os.getuid(), os.getgid()
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", USER], capture_output=True)
        if made.returncode != 0:
            return None
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def _python_for(mode: str) -> str:
    return sys.executable if mode == "root" else "/usr/bin/python3"


@pytest.fixture(params=["root", "user"])
def mode(request) -> str:
    if request.param == "root" and not IS_ROOT:
        pytest.skip("not root: the root half of these tests needs root")
    if request.param == "user":
        ids = _ordinary_user()
        if ids is None or not shutil.which("setpriv") and IS_ROOT:
            pytest.skip("cannot switch to an ordinary user here (useradd or setpriv missing)")
        probe = _run(["-c", "import engine.evals.code"], "user", cwd=ROOT)
        if probe.returncode != 0:
            pytest.skip(f"the ordinary user cannot import engine from {ROOT}: {probe.stderr[-300:]}")
    return request.param


@pytest.fixture(params=["builtin", "bwrap"])
def sandbox(request) -> str:
    """The sandbox backend `tas eval-code --sandbox` gets."""
    if request.param == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap): the bwrap backend is untested here")
    return request.param


def _run(args: list[str], mode: str, cwd: Path, env: dict | None = None, wrap: list[str] | None = None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})}
    command = [_python_for(mode), *args]
    if mode == "user" and IS_ROOT:
        uid, gid = _ordinary_user()
        command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command]
    return subprocess.run([*(wrap or []), *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def place(mode):
    """A home and a project folder of the user that runs the eval, with the secrets an audit went after."""
    base = Path(tempfile.mkdtemp(prefix="tas-attack-"))
    home, project = base / "home", base / "project"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    project.mkdir()
    secret = {
        "env": "sk-dotenv" + secrets.token_hex(16),
        "hf": "hf_" + secrets.token_hex(16),
        "openai": "sk-environ" + secrets.token_hex(16),
    }
    (project / ".env").write_text(f"OPENAI_API_KEY={secret['env']}\n")
    (home / ".cache" / "huggingface" / "token").write_text(secret["hf"])
    (home / ".bashrc").write_text("# rc\n")
    (project / "source.py").write_text("VALUE = 1\n")
    owner = _ordinary_user() if mode == "user" else (0, 0)
    for path in [base, *base.rglob("*")]:
        os.chown(path, *owner) if IS_ROOT else None
        if path.is_file():
            path.chmod(0o600)
    base.chmod(0o755)
    yield {"base": base, "home": home, "project": project, "secret": secret}
    shutil.rmtree(base, ignore_errors=True)


def eval_code(
    place: dict, mode: str, completions: list[str], *extra: str, env: dict | None = None, wrap=None, sandbox="builtin"
):
    """Run `tas eval-code --sandbox SANDBOX` on these completions (all for TASK); returns (returncode,
    summary, rows, output)."""
    samples = place["project"] / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": TASK, "completion": c}) + "\n" for c in completions))
    if IS_ROOT and mode == "user":
        os.chown(samples, *_ordinary_user())
    out = place["project"] / "results.jsonl"
    env = {"HOME": str(place["home"]), "OPENAI_API_KEY": place["secret"]["openai"], **(env or {})}
    before = set(os.listdir("/tmp"))
    done = _run(
        ["-m", "engine.evals.code", str(samples), "--benchmark", "tiny-python", "--workers", "2", "--timeout", "8",
         "--k", "1", "--out", str(out), "--sandbox", sandbox, *extra],
        mode, cwd=place["project"], env=env, wrap=wrap,
    )  # fmt: skip
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("tas-sandbox")}  # nothing left there
    assert_no_sandbox_processes()
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    summary = json.loads(done.stdout) if done.returncode == 0 else {}
    return done.returncode, summary, rows, done.stdout + done.stderr


def assert_no_sandbox_processes(within_s: float = 15.0) -> None:
    """No sandbox process outlives its eval. A leftover is an orphan: the top of its tree of sandbox
    processes has no live eval above it (its parent is init, pid 1). A sandbox with a live eval above it
    belongs to a run still going on, such as another test's in a parallel pytest worker. The grace covers
    the kernel's teardown of a killed sandbox's PID namespace on a loaded machine (seen over 5 s at load 10)."""

    def is_sandbox(proc: psutil.Process) -> bool:
        try:
            return proc.status() != psutil.STATUS_ZOMBIE and "sandbox_child.py" in " ".join(proc.cmdline())
        except psutil.Error:
            return False

    def orphaned(proc: psutil.Process) -> bool:
        try:
            while (parent := proc.parent()) is not None and is_sandbox(parent):
                proc = parent
            return parent is None or parent.pid == 1
        except psutil.Error:
            return False

    def alive():
        return [proc.pid for proc in psutil.process_iter() if is_sandbox(proc) and orphaned(proc)]

    deadline = time.monotonic() + within_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()


def test_secrets_of_the_user_are_out_of_reach(place, mode, sandbox):
    attack = (
        "def add_11(x):\n"
        "    import os, glob\n"
        "    found = []\n"
        f"    for path in [{str(place['project'] / '.env')!r}, {str(place['home'] / '.cache/huggingface/token')!r},\n"
        "                 os.path.expanduser('~/.cache/huggingface/token'), '.env'] + glob.glob('/proc/*/environ'):\n"
        "        try:\n"
        "            found.append(open(path).read())\n"
        "        except OSError:\n"
        "            pass\n"
        "    raise AssertionError('searched: ' + repr(found) + repr(dict(os.environ)))\n"
    )
    code, summary, rows, output = eval_code(place, mode, [attack], sandbox=sandbox)
    assert code == 0 and summary["sandbox"]["isolation"] == ISOLATION[sandbox]
    assert "searched: " in rows[0]["error"]  # it ran
    text = place["project"].joinpath("results.jsonl").read_text() + output
    for value in place["secret"].values():
        assert value not in text


def test_files_of_the_user_cannot_be_changed(place, mode, sandbox):
    attack = (
        "def add_11(x):\n"
        "    import os\n"
        "    done = []\n"
        f"    for path in [{str(place['home'] / '.bashrc')!r}, {str(place['project'] / 'source.py')!r},\n"
        "                 os.path.expanduser('~/.bashrc')]:\n"
        "        try:\n"
        "            with open(path, 'a') as f:\n"
        "                f.write('echo owned\\n')\n"
        "            done.append(path)\n"
        "        except OSError as exc:\n"
        "            done.append(repr(exc))\n"
        "    raise AssertionError(repr(done))\n"
    )
    code, _, rows, _ = eval_code(place, mode, [attack], sandbox=sandbox)
    assert code == 0 and not rows[0]["passed"]
    assert (place["home"] / ".bashrc").read_text() == "# rc\n"
    assert (place["project"] / "source.py").read_text() == "VALUE = 1\n"


def test_one_sample_cannot_tamper_with_the_others(place, mode, sandbox):
    """The audit's poller found the other samples' programs in /tmp and rewrote them to pass."""
    poller = (
        "import os, time\n"
        "def add_11(x):\n"
        "    import glob\n"
        "    deadline = time.time() + 4\n"
        "    while time.time() < deadline:\n"
        "        for top in ('/tmp/tas-sandbox-*', '/var/tmp/*', '/dev/shm/*', '/work/*'):\n"
        "            for path in glob.glob(top) + glob.glob(top + '/*'):\n"
        "                try:\n"
        "                    with open(path, 'w') as f:\n"
        f"                        f.write({RIGHT!r})\n"
        "                except OSError:\n"
        "                    pass\n"
        "    return x\n"
    )
    code, summary, rows, _ = eval_code(place, mode, [poller] + [WRONG] * 12, sandbox=sandbox)
    assert code == 0
    assert summary["pass@1"] == 0.0 and [r["passed"] for r in rows] == [False] * 13


def test_no_signals_network_or_daemons_outside(place, mode, sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    unix_path = place["base"] / "host.sock"
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(str(unix_path))
    unix_listener.listen(1)
    unix_path.chmod(0o777)
    owner = _ordinary_user() if mode == "user" else (0, 0)
    sleeper = subprocess.Popen(
        ["sleep", "300"], user=owner[0] if IS_ROOT else None, group=owner[1] if IS_ROOT else None
    )  # one of the user's processes
    attack = (
        "import os, signal, socket\n"
        "def add_11(x):\n"
        "    notes = []\n"
        "    if os.fork() == 0:\n"  # a daemon that would outlive the eval
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            import time\n"
        "            time.sleep(300)\n"
        "        os._exit(0)\n"
        f"    for pid in (-1, {sleeper.pid}, {os.getpid()}):\n"
        "        try:\n"
        "            os.kill(pid, signal.SIGKILL)\n"
        "        except OSError as exc:\n"
        "            notes.append(exc.errno)\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "        notes.append('tcp connected')\n"
        "    except OSError:\n"
        "        notes.append('no tcp')\n"
        "    try:\n"
        "        s = socket.socket(socket.AF_UNIX)\n"
        f"        s.connect({str(unix_path)!r})\n"
        "        notes.append('unix connected')\n"
        "    except OSError:\n"
        "        notes.append('no unix')\n"
        "    raise AssertionError(repr(notes))\n"
    )
    try:
        code, _, rows, _ = eval_code(place, mode, [attack], sandbox=sandbox)
        assert code == 0 and not rows[0]["passed"]
        assert "no tcp" in rows[0]["error"] and "no unix" in rows[0]["error"], rows[0]["error"]
        assert sleeper.poll() is None and psutil.Process().is_running()
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        sleeper.kill()
        sleeper.wait()
        listener.close()
        unix_listener.close()


def test_nothing_persists_and_limits_hold(place, mode, sandbox):
    marker = "tas-attack-marker-" + secrets.token_hex(4)
    attack = (
        "import ctypes, os, socket\n"
        "def add_11(x):\n"
        "    notes = []\n"
        "    for folder in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        f"        open(os.path.join(folder, {marker!r}), 'w').write('x')\n"
        f"    socket.socket(socket.AF_UNIX).bind('/tmp/{marker}.sock')\n"
        "    files = []\n"
        "    try:\n"
        "        while len(files) < 20000:\n"
        "            files.append(open('/dev/null'))\n"
        "    except OSError:\n"
        "        pass\n"
        "    notes.append('files=%d' % len(files))\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    denied = [libc.unshare(0x10000000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
        "              libc.ptrace(16, 1, 0, 0), libc.syscall(321, 0, 0, 0), libc.syscall(250, 0, 0, 0)]\n"
        "    notes.append('calls=%r' % denied)\n"
        "    raise AssertionError(' '.join(notes))\n"
    )
    code, _, rows, _ = eval_code(place, mode, [attack], sandbox=sandbox)
    assert code == 0 and not rows[0]["passed"]
    error = rows[0]["error"]
    assert "calls=[-1, -1, -1, -1, -1]" in error, error  # unshare, mount, ptrace, bpf, keyctl all refused
    opened = int(error.split("files=")[1].split()[0])
    assert opened < 300
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not [n for n in os.listdir(folder) if n.startswith(marker)]


def _message(value) -> bytes:
    data = b"".join(encode(value))
    return len(data).to_bytes(4, "big") + data


FIND_THE_TOKEN = (  # the old sandbox kept its completion token in a local of the frame that ran the program
    "def forge():\n"
    "    frame = sys._getframe(1)\n"
    "    while frame is not None:\n"
    "        seen = frame.f_locals\n"
    "        if isinstance(seen.get('token'), bytes) and isinstance(seen.get('token_fd'), int):\n"
    "            os.write(seen['token_fd'], seen['token'])\n"
    "            os._exit(0)\n"
    "        frame = frame.f_back\n"
)
# What init reports for a wrong answer, and a message saying "passed" (sandbox_child's format)
INIT_REPORT = _message({"passed": False, "program_exited": False, "checker_exit": 1, "exit": 0})
FORGED_PASS = _message({"passed": True})
FORGERIES = {
    "token-in-frames": ("import os, sys\n" + FIND_THE_TOKEN + "def add_11(x):\n    forge()\n    return x\n"),
    "stdout-flush": (
        "import os, sys\n" + FIND_THE_TOKEN + "class Out:\n"
        "    def write(self, text):\n"
        "        return len(text)\n"
        "    def flush(self):\n"
        "        forge()\n"
        "sys.stdout = Out()\n"
        "def add_11(x):\n"
        "    return x\n"
    ),
    "forged-report": (
        "import os\n"
        "def add_11(x):\n"
        "    for fd in range(64):\n"
        "        try:\n"
        "            os.write(fd, b'\\x00\\x00\\x00\\x0e{\"passed\":true}\\ncompleted=1\\nexit=0\\n')\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n"
    ),
    "init-report": (  # a pass where init's report ends: init writes its report over the start of the file
        "def add_11(x):\n"
        "    with open('/proc/1/fd/1', 'ab') as report:\n"
        f"        report.write(bytes({len(INIT_REPORT)}) + {FORGED_PASS!r})\n"
        "    return x\n"
    ),
    "settrace": (  # swaps the tests' `candidate` for one whose results equal anything
        "import sys\n"
        "class Yes:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "def local(frame, event, arg):\n"
        "    if 'candidate' in frame.f_locals:\n"
        "        frame.f_locals['candidate'] = lambda *a, **k: Yes()\n"
        "    return local\n"
        "def tracer(frame, event, arg):\n"
        "    return local if frame.f_code.co_name == 'check' else tracer\n"
        "sys.settrace(tracer)\n"
        "def add_11(x):\n"
        "    return x\n"
    ),
    "always-equal": (
        "class Anything(int):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add_11(x):\n"
        "    return Anything(0)\n"
    ),
    "carriage-return": (
        "import sys\n"
        "print('\\rpassed=1\\rcompleted=1\\r', file=sys.stderr)\n"
        "print('\\rpassed=1\\rcompleted=1\\r')\n"
        "def add_11(x):\n"
        "    return x\n"
    ),
}


def test_a_program_cannot_forge_its_score(place, mode, sandbox):
    code, summary, rows, output = eval_code(place, mode, list(FORGERIES.values()) + [RIGHT], sandbox=sandbox)
    assert code == 0
    assert [r["passed"] for r in rows] == [False] * len(FORGERIES) + [True], [r["error"][-300:] for r in rows]
    assert summary["n_passed"] == 1


def test_a_fork_bomb_does_not_starve_the_other_samples(place, mode, sandbox):
    bomb = (
        "import os, time\n"
        "def add_11(x):\n"
        "    for _ in range(300):\n"
        "        try:\n"
        "            if os.fork() == 0:\n"
        "                time.sleep(30)\n"
        "                os._exit(0)\n"
        "        except OSError:\n"
        "            time.sleep(0.01)\n"
        "    return x\n"
    )
    forks = "import os\ndef add_11(x):\n    if os.fork() == 0:\n        os._exit(0)\n    os.wait()\n    return x + 11\n"
    code, _, rows, _ = eval_code(place, mode, [bomb] + [forks] * 4, sandbox=sandbox)
    assert code == 0
    assert [r["passed"] for r in rows[1:]] == [True] * 4, [r["error"][-300:] for r in rows]


def test_each_sample_has_its_own_process_limit(place, mode, sandbox):
    counter = (
        "import os, time\n"
        "def add_11(x):\n"
        "    started = 0\n"
        "    try:\n"
        "        while started < 1000:\n"
        "            if os.fork() == 0:\n"
        "                time.sleep(5)\n"
        "                os._exit(0)\n"
        "            started += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "    raise AssertionError('started=%d' % started)\n"
    )
    code, _, rows, _ = eval_code(place, mode, [counter, counter], sandbox=sandbox)
    assert code == 0
    for row in rows:  # 64 processes a sample (its program and checker among them), whoever else runs
        assert 50 <= int(row["error"].split("started=")[1].split()[0]) < 64, row["error"]


@pytest.mark.parametrize("mode", ["root"])  # the attack makes root overwrite a root-owned file
def test_out_does_not_follow_a_link_planted_in_a_shared_folder(place, mode):
    if not IS_ROOT:
        pytest.skip("not root: the attack makes root overwrite a root-owned file")
    shared = Path(tempfile.mkdtemp(prefix="tas-shared-"))
    victim = place["base"] / "victim"
    victim.write_text("root's file\n")
    try:
        shared.chmod(0o1777)
        (shared / "results.jsonl").symlink_to(victim)
        samples = place["project"] / "samples.jsonl"
        samples.write_text(json.dumps({"task_id": TASK, "completion": RIGHT}) + "\n")
        args = ["-m", "engine.evals.code", str(samples), "--benchmark", "tiny-python", "--out"]
        done = _run([*args, str(shared / "results.jsonl")], "root", cwd=place["project"])
        assert done.returncode == 2 and "symbolic link" in done.stderr
        assert victim.read_text() == "root's file\n"
        shared.chmod(0o777)  # writable by all without the sticky bit: anyone could swap in a link later
        done = _run([*args, str(shared / "new.jsonl")], "root", cwd=place["project"])
        assert done.returncode == 2 and "another user" in done.stderr
        assert not (shared / "new.jsonl").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_sockets_only_of_the_families_the_network_namespace_isolates(place, mode, sandbox):
    attack = (
        "import socket\n"
        "def add_11(x):\n"
        "    made = []\n"
        "    for name in ('AF_VSOCK', 'AF_NETLINK', 'AF_PACKET', 'AF_UNIX', 'AF_INET'):\n"
        "        kind = socket.SOCK_STREAM if name in ('AF_VSOCK', 'AF_UNIX', 'AF_INET') else socket.SOCK_DGRAM\n"
        "        try:\n"
        "            socket.socket(getattr(socket, name), kind).close()\n"
        "            made.append(name)\n"
        "        except OSError:\n"
        "            pass\n"
        "    try:\n"
        "        socket.socketpair(socket.AF_VSOCK)\n"
        "        made.append('pair')\n"
        "    except OSError:\n"
        "        pass\n"
        "    raise AssertionError('made=' + ','.join(made) + ';')\n"
    )
    code, _, rows, _ = eval_code(place, mode, [attack], sandbox=sandbox)
    assert code == 0
    assert "made=AF_UNIX,AF_INET;" in rows[0]["error"], rows[0]["error"][-500:]


def test_signals_to_the_sandbox_init_change_neither_verdict_nor_isolation(place, mode, sandbox):
    signals = "import os, signal, time\nfor sig in ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGALRM'):\n"
    signals += (
        "    try:\n        os.kill(1, getattr(signal, sig))\n    except OSError:\n        pass\ntime.sleep(0.2)\n"
    )
    code, summary, rows, _ = eval_code(place, mode, [signals + RIGHT, signals + WRONG], sandbox=sandbox)
    assert code == 0
    assert [(r["passed"], r["status"], r["isolation"]) for r in rows] == [
        (True, "passed", ISOLATION[sandbox]),
        (False, "failed", ISOLATION[sandbox]),
    ], [r["error"][-300:] for r in rows]
    assert summary["sandbox"]["isolation"] == ISOLATION[sandbox]


HIJACK = r"""
import os
STDLIB = os.path.dirname(os.__file__)
FORGE = "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'\\x00\\x00\\x00\\x0dd1;s6;passedT')\n    except OSError: pass\nos._exit(0)\n"
changed = []
def attempt(what, *args):
    try:
        what(*args)
        changed.append((what.__name__, args[0]))
    except OSError:
        pass
def plant(folder):
    def write(path):
        with open(path, "w") as f:
            f.write(FORGE)
    attempt(os.makedirs, folder, 0o755, True)
    for name in ("json.py", "hashlib.py", "base64.py", "python311.zip"):
        attempt(write, os.path.join(folder, name))
prefix = os.path.dirname(os.path.dirname(STDLIB))  # the stdlib's parents: a plain folder of the new root
attempt(os.rename, prefix, prefix + ".old")
plant(STDLIB)
attempt(os.rename, "/lib", "/lib.orig")
attempt(os.symlink, "/work", "/lib")
writable = ("/tmp", "/var/tmp", "/dev/shm", "/work", "/proc", "/dev")
folders = {"/", STDLIB, STDLIB + "/lib-dynload", "/usr/lib", "/usr/lib/x86_64-linux-gnu"}
path = STDLIB
while path != "/":
    path = os.path.dirname(path)
    folders.add(path)
for name in os.listdir("/"):
    folders.add("/" + name)
for folder in sorted(folders):
    if not folder.startswith(writable) and folder != "/dev":
        plant(folder)
plant("/tmp")  # where the program may write: not on the checker's path
def add_11(x):
    return x  # wrong on purpose
"""
HIJACK_TESTS = "def check(candidate):\n    r = candidate(0)\n    import json, hashlib, base64\n    assert r == 11\n"
RUN_ONE = """
import json, sys
from engine.evals.sandbox import Program, run_program
r = run_program(Program(sys.argv[1], sys.argv[2], "add_11"), timeout_s=8, backend=sys.argv[3])
print(json.dumps([r.passed, r.status, r.isolation, r.error]))
"""


@pytest.fixture
def python_outside_usr():
    """A copy of the system Python with its standard library in /opt, like pyenv's, uv's or conda's: its
    folders are not under a read-only bind of /usr, so only a read-only root keeps the program off them."""
    base = Path(tempfile.mkdtemp(prefix="tas-python-", dir="/opt" if os.path.isdir("/opt") else None))
    version = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    try:
        base.chmod(0o755)
        (base / "bin").mkdir()
        shutil.copy2(os.path.realpath("/usr/bin/python3"), base / "bin" / "python3")
        shutil.copytree(
            f"/usr/lib/python{version}",
            base / "lib" / f"python{version}",
            ignore=shutil.ignore_patterns("dist-packages", "site-packages", "test", "__pycache__"),
        )
        yield str(base / "bin" / "python3")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_program_cannot_change_what_the_checker_loads(place, mode, sandbox, python_outside_usr, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_python_for", lambda mode: python_outside_usr)
    done = _run(["-c", RUN_ONE, HIJACK, HIJACK_TESTS, sandbox], mode, cwd=place["project"])
    assert done.returncode == 0, done.stderr[-2000:]
    passed, status, isolation, error = json.loads(done.stdout)
    assert isolation == ISOLATION[sandbox] and not passed and status == "failed", error[-1000:]
    assert "AssertionError" in error, error[-1000:]  # the checker ran the real tests, with the real json


@pytest.mark.parametrize("mode", ["root"])  # the attack makes root write into a folder of root's
def test_out_does_not_follow_a_link_planted_above_it(place, mode):
    if not IS_ROOT:
        pytest.skip("not root: the attack makes root write into a folder of root's")
    shared = Path(tempfile.mkdtemp(prefix="tas-shared-"))
    roots = place["base"] / "roots"
    (roots / "run1").mkdir(parents=True)
    try:
        shared.chmod(0o1777)
        (shared / "evals").symlink_to(roots)  # as an ordinary user could plant it in a sticky shared folder
        samples = place["project"] / "samples.jsonl"
        samples.write_text(json.dumps({"task_id": TASK, "completion": RIGHT}) + "\n")
        args = ["-m", "engine.evals.code", str(samples), "--benchmark", "tiny-python", "--out"]
        for out in (shared / "evals" / "run1" / "out.jsonl", shared / "evals" / "run2" / "out.jsonl"):
            done = _run([*args, str(out)], "root", cwd=place["project"])
            assert done.returncode == 2 and "symbolic link" in done.stderr, done.stderr[-500:]
        assert sorted(p.name for p in roots.rglob("*")) == ["run1"]
        relative = Path("evals") / "run1" / "out.jsonl"  # the same, reached from the folder
        done = _run([*args, str(relative)], "root", cwd=shared)
        assert done.returncode == 2 and "symbolic link" in done.stderr, done.stderr[-500:]
        assert sorted(p.name for p in roots.rglob("*")) == ["run1"]
        good = shared / "mine" / "deeper" / "out.jsonl"  # made as we go: no link on the way
        done = _run([*args, str(good)], "root", cwd=place["project"])
        assert done.returncode == 0 and json.loads(good.read_text())["passed"] is True, done.stderr[-500:]
        (place["base"] / "runs").symlink_to(roots)  # root's own link in root's own 0755 folder: followed
        done = _run([*args, str(place["base"] / "runs" / "run1" / "out.jsonl")], "root", cwd=place["project"])
        assert done.returncode == 0 and (roots / "run1" / "out.jsonl").exists(), done.stderr[-500:]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


NO_USERNS = """
import os, sys, ctypes
uid, gid = int(sys.argv[1]), int(sys.argv[2])
unshared, mapped = os.pipe(), os.pipe()
child = os.fork()
if child == 0:
    ctypes.CDLL(None).unshare(0x10000000)
    os.write(unshared[1], b"x")
    os.read(mapped[0], 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.execv(sys.argv[3], sys.argv[3:])
os.read(unshared[0], 1)
for name, inner in (("uid_map", uid), ("gid_map", gid)):
    with open(f"/proc/{child}/{name}", "w") as f:
        f.write(f"0 0 1\\n{inner} {inner} 1\\n")
os.write(mapped[1], b"x")
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("mode", ["user"])
def test_without_user_namespaces_the_eval_refuses_unless_allowed(place, mode):
    if not IS_ROOT:
        pytest.skip("needs root to make an ordinary user's namespace where user namespaces are switched off")
    uid, gid = _ordinary_user()
    wrap = [sys.executable, "-c", NO_USERNS, str(uid), str(gid)]
    # _run puts setpriv in front for the user; here the wrapper switches user itself
    env = {"HOME": str(place["home"]), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    samples = place["project"] / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": TASK, "completion": RIGHT}) + "\n")
    os.chown(samples, uid, gid)
    command = [*wrap, "/usr/bin/python3", "-m", "engine.evals.code", str(samples), "--benchmark", "tiny-python"]
    before = set(os.listdir("/tmp"))
    done = subprocess.run(command, cwd=place["project"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "user namespaces" in done.stderr and "--allow-unsandboxed" in done.stderr
    done = subprocess.run(
        [*command, "--allow-unsandboxed", "--out", str(place["project"] / "results.jsonl")],
        cwd=place["project"], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sandbox"]["isolation"] == "none" and summary["pass@1"] == 1.0
    rows = [json.loads(line) for line in (place["project"] / "results.jsonl").read_text().splitlines()]
    assert rows[0]["isolation"] == "none"
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("tas-sandbox")]


@pytest.fixture
def setuid_bwrap():
    """A setuid-root copy of bwrap, as hosts without unprivileged user namespaces install it."""
    if not IS_ROOT or shutil.which("bwrap") is None:
        pytest.skip("needs root and bubblewrap (apt-get install bubblewrap) to make a setuid bwrap")
    folder = Path(tempfile.mkdtemp(prefix="tas-bwrap-", dir="/opt" if os.path.isdir("/opt") else None))
    try:
        folder.chmod(0o755)
        shutil.copy2(shutil.which("bwrap"), folder / "bwrap")
        (folder / "bwrap").chmod(0o4755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("mode", ["user"])
def test_without_user_namespaces_a_setuid_bwrap_still_isolates(place, mode, setuid_bwrap):
    """What the bwrap backend is for: where user namespaces are off, our own backend refuses (above), but a
    setuid bwrap makes the namespaces, and `--sandbox auto` picks it."""
    uid, gid = _ordinary_user()
    attack = (
        "def add_11(x):\n"
        "    import glob, os\n"
        "    found = []\n"
        f"    for path in [{str(place['project'] / '.env')!r}, {str(place['home'] / '.cache/huggingface/token')!r}]"
        " + glob.glob('/proc/*/environ'):\n"
        "        try:\n"
        "            found.append(open(path).read())\n"
        "        except OSError:\n"
        "            pass\n"
        f"    for path in [{str(place['home'] / '.bashrc')!r}, {str(place['project'] / 'source.py')!r}]:\n"
        "        try:\n"
        "            open(path, 'a').write('echo owned\\n')\n"
        "        except OSError:\n"
        "            pass\n"
        "    raise AssertionError('searched: ' + repr(found) + repr(dict(os.environ)))\n"
    )
    samples, out = place["project"] / "samples.jsonl", place["project"] / "results.jsonl"
    samples.write_text("".join(json.dumps({"task_id": TASK, "completion": c}) + "\n" for c in (attack, RIGHT)))
    os.chown(samples, uid, gid)
    env = {"HOME": str(place["home"]), "PATH": f"{setuid_bwrap}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    env["OPENAI_API_KEY"] = place["secret"]["openai"]
    command = [sys.executable, "-c", NO_USERNS, str(uid), str(gid), "/usr/bin/python3", "-m", "engine.evals.code"]
    command += [str(samples), "--benchmark", "tiny-python", "--k", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=place["project"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary, rows = json.loads(done.stdout), [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["sandbox"]["isolation"] == "bwrap" and [r["passed"] for r in rows] == [False, True]
    assert "searched: " in rows[0]["error"]  # it ran
    for value in place["secret"].values():
        assert value not in out.read_text() + done.stdout + done.stderr
    assert (place["home"] / ".bashrc").read_text() == "# rc\n"
    assert (place["project"] / "source.py").read_text() == "VALUE = 1\n"
    assert_no_sandbox_processes()


# --- second review (issue 23, findings F1-F8) ------------------------------------------------------------


def _a_folder_below_usr() -> str | None:
    return next((p for p in ("/usr/local/games", "/usr/local/src", "/usr/src", "/usr/games") if os.path.isdir(p)), None)


def test_a_writable_mount_below_usr_is_read_only_inside(place, mode):
    """F1: a remount makes only the top of a bind read-only; a mount below /usr (/usr/local on a disk of
    its own) stayed writable, and the program's files landed on the host. The mount is made in a private
    mount namespace, so the host's mounts stay as they are."""
    folder = _a_folder_below_usr()
    if not IS_ROOT or folder is None or not shutil.which("unshare"):
        pytest.skip("needs root, unshare and a folder below /usr to mount a writable tmpfs on")
    mount = f'mount -t tmpfs -o mode=1777 tmpfs {folder} && exec "$@"'
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]
    attack = (
        "def add_11(x):\n"
        "    try:\n"
        f"        open({folder + '/written-from-sandbox'!r}, 'w').write('sandbox was here')\n"
        "        raise AssertionError('wrote=yes;')\n"
        "    except OSError as exc:\n"
        "        raise AssertionError('wrote=%s;' % exc.strerror)\n"
    )
    code, _, rows, _ = eval_code(place, mode, [attack], wrap=wrap)
    assert code == 0 and "wrote=Read-only file system;" in rows[0]["error"], rows[0]["error"][-500:]


MOUNT_TREE = """
import os, sys
from engine.evals import sandbox_child as child
if sys.argv[1] == "fallback":
    child._read_only_recursively = lambda target: False  # as on Linux < 5.12: no mount_setattr
base = sys.argv[2]  # a folder of the test's; the tmpfs on it goes with the mount namespace
child._mount("tmpfs", base, "tmpfs", 0, "size=1m")
os.makedirs(base + "/source/sub")
child._mount("tmpfs", base + "/source/sub", "tmpfs", 0, "size=1m,mode=1777")
child._bind_read_only(base + "/source", base + "/bound")
written = []
for path in ("/bound/top", "/bound/sub/below", "/source/sub/below"):
    try:
        open(base + path, "w").close()
        written.append(path)
    except OSError:
        pass
print(written)
"""


@pytest.mark.parametrize("how", ["mount_setattr", "fallback"])
def test_a_read_only_bind_is_read_only_all_the_way_down(how, tmp_path):
    """F1, both ways the child does it: mount_setattr(AT_RECURSIVE), and one remount per mount below."""
    if not IS_ROOT or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount namespace")
    command = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", MOUNT_TREE, how, str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip() == "['/source/sub/below']"  # only the original stays writable


KERNEL_RESOURCES = (
    "import ctypes, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "calls = {'shmget': lambda: libc.shmget(0, 1 << 20, 0o1600), 'msgget': lambda: libc.msgget(0, 0o1600),\n"
    "         'semget': lambda: libc.semget(0, 1, 0o1600), 'memfd_create': lambda: libc.memfd_create(b'm', 0),\n"
    "         'inotify_init1': lambda: libc.inotify_init1(0), 'setsid': lambda: libc.setsid(),\n"
    "         'setpgid': lambda: libc.setpgid(0, 0)}\n"
    "allowed = [name for name, call in calls.items() if call() >= 0 or ctypes.get_errno() != 1]\n"
    "made = 0\n"
    "try:\n"
    "    while made < 30000:\n"
    "        os.mkdir('/tmp/%d' % made)\n"
    "        made += 1\n"
    "except OSError:\n"
    "    pass\n"
    "def add_11(x):\n"
    "    raise AssertionError('allowed=%s; made=%d;' % (','.join(allowed), made))\n"
)


def test_kernel_resources_no_limit_covers_are_refused(place, mode):
    """F2, F3, F4, F6: SysV IPC and memfds hold memory past RLIMIT_AS that the OOM killer cannot find;
    empty folders fill a tmpfs's inodes (kernel memory) while its size says free; inotify uses the
    user's host-wide quota; setsid gives each process an autogroup of its own (a CPU share)."""
    code, _, rows, _ = eval_code(place, mode, [KERNEL_RESOURCES])
    assert code == 0
    error = rows[0]["error"]
    assert "allowed=;" in error, error[-500:]
    assert int(error.split("made=")[1].split(";")[0]) <= 16384, error[-500:]


def test_what_the_program_does_is_not_blamed_on_the_sandbox(place, mode):
    """F7: exit status 125 is the program's, not a setup failure; kill(0) reaches the sandbox's own
    process group, not its supervisor outside the PID namespace (as an ordinary user it could)."""
    exit_125 = "import os\nos._exit(125)\n" + RIGHT
    kill_group = "import os, signal\nos.kill(0, signal.SIGKILL)\n" + RIGHT
    code, _, rows, _ = eval_code(place, mode, [exit_125, kill_group, RIGHT])
    assert code == 0
    assert [r["status"] for r in rows] == ["failed", "failed", "passed"], [r["error"][-300:] for r in rows]
    assert "could not start" not in rows[0]["error"] and "without a report" not in rows[1]["error"]


def test_site_packages_and_the_folders_above_the_standard_library_stay_hidden(
    place, mode, python_outside_usr, monkeypatch, sandbox
):
    """F8: the folders above the standard library's bind are the sandbox's own; made 0755 they let any
    sample list what the host keeps behind a 0700 home (site-packages, the pyenv tree)."""
    stdlib = next(Path(python_outside_usr).parent.parent.glob("lib/python3*"))
    (stdlib / "site-packages").mkdir()
    (stdlib / "site-packages" / "secret.pth").write_text("import os\n")
    monkeypatch.setattr(sys.modules[__name__], "_python_for", lambda mode: python_outside_usr)
    program = (
        "import os\n"
        "stdlib = os.path.dirname(os.__file__)\n"
        "seen = os.listdir(stdlib + '/site-packages')\n"
        "listable = [p for p in (os.path.dirname(stdlib), os.path.dirname(os.path.dirname(stdlib))) if os.access(p, os.R_OK)]\n"
        "def add_11(x):\n"
        "    raise AssertionError('seen=%r; listable=%r;' % (seen, listable))\n"
    )
    done = _run(["-c", RUN_ONE, program, HIJACK_TESTS, sandbox], mode, cwd=place["project"])
    assert done.returncode == 0, done.stderr[-2000:]
    error = json.loads(done.stdout)[3]
    assert "seen=[];" in error, error[-500:]
    if mode == "root":  # as an ordinary user the sandbox's folders are the user's own
        assert "listable=[];" in error, error[-500:]
