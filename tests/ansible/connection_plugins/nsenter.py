"""Test-only Ansible connection: run tasks inside a drill container with nsenter.

The drill containers (tests/bed.py) have a private network and no ssh; they are entered
with `nsenter -t PID -a`, PID being the container's systemd as the host sees it.  The drill
points Ansible here with ANSIBLE_CONNECTION_PLUGINS=tests/ansible/connection_plugins and an
inventory such as

    box1: {ansible_connection: nsenter, ansible_nsenter_pid: 12345}

Root on the host is root inside, so the role runs without become.  Every command gets a
timeout; commands run under a clean environment (like bed.Container.run).  Never used by
selfheal or the role itself: a real user's hosts are reached over ssh.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = """
    name: nsenter
    short_description: run inside a container's namespaces with nsenter (selfheal drills only)
    description:
        - Executes commands, and copies files in and out, through C(nsenter -t PID -a).
    author: selfheal tests
    extends_documentation_fragment:
        - connection_pipelining
    options:
      pid:
        description: PID (seen from the host) of the container's init process.
        vars:
          - name: ansible_nsenter_pid
        required: true
      timeout:
        description: Seconds any one command or file transfer may take.
        type: int
        default: 300
        vars:
          - name: ansible_nsenter_timeout
"""

import os
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils._text import to_bytes, to_native
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()

NSENTER = "/usr/bin/nsenter"
INSIDE_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
]


class Connection(ConnectionBase):
    """Each exec_command is one `nsenter ... /bin/sh -c CMD`; nothing stays open."""

    transport = "nsenter"
    has_pipelining = True
    default_user = "root"

    def _enter(self):
        pid = str(self.get_option("pid"))
        if not pid.isdigit() or not os.path.isdir("/proc/" + pid):
            raise AnsibleConnectionFailure("nsenter: no process %r (is the container running?)" % pid)
        return [NSENTER, "-t", pid, "-a", "--", "env", "-i"] + INSIDE_ENV

    def _run(self, argv, stdin_bytes=None, stdin_file=None, stdout_file=None):
        timeout = int(self.get_option("timeout"))
        try:
            done = subprocess.run(
                argv,
                input=stdin_bytes if stdin_file is None else None,
                stdin=stdin_file if stdin_file is not None else (None if stdin_bytes is not None else subprocess.DEVNULL),
                stdout=stdout_file if stdout_file is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise AnsibleConnectionFailure("nsenter: %r took more than %d s" % (argv[-1], timeout))
        return done.returncode, done.stdout or b"", done.stderr or b""

    def _connect(self):
        if not self._connected:
            self._enter()  # fails early when the container is gone
            self._play_context.remote_user = self.default_user
            self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        display.vvv("NSENTER EXEC %s" % cmd, host=self._play_context.remote_addr)
        argv = self._enter() + ["/bin/sh", "-c", to_bytes(cmd, errors="surrogate_or_strict")]
        return self._run(argv, stdin_bytes=in_data if in_data is not None else b"")

    def put_file(self, in_path, out_path):
        super(Connection, self).put_file(in_path, out_path)
        display.vvv("NSENTER PUT %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        if not os.path.isfile(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound("file not found: %s" % to_native(in_path))
        argv = self._enter() + ["/bin/sh", "-c", 'cat > "$1"', "sh", out_path]
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as source:
            rc, _, err = self._run(argv, stdin_file=source)
        if rc != 0:
            raise AnsibleError("nsenter: copying to %s failed: %s" % (out_path, to_native(err)))

    def fetch_file(self, in_path, out_path):
        super(Connection, self).fetch_file(in_path, out_path)
        display.vvv("NSENTER FETCH %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        argv = self._enter() + ["cat", "--", in_path]
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as target:
            rc, _, err = self._run(argv, stdout_file=target)
        if rc != 0:
            raise AnsibleError("nsenter: fetching %s failed: %s" % (in_path, to_native(err)))

    def close(self):
        self._connected = False
