#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""The Debian package, end to end, on this machine (suite `packaging`, needs root).

1. builds the package (packaging/build-deb.sh) and, in the background, an "upgrade" build
   of it with version 0.1.0+test2;
2. lintian: no error and no warning that is not overridden;
3. dpkg -i; checks files, modes, conffiles, the fieldhub user, man pages,
   `systemd-analyze verify` and `systemd-analyze security --offline=true --threshold=`;
4. runs the INSTALLED /usr/sbin/fieldhubd as user fieldhub with the installed default
   configuration, in a private mount namespace (so nothing on the machine is touched) with
   its own /run, a standalone systemd-journald and a NOTIFY_SOCKET listener: READY=1,
   `fieldhubctl reload --wait` (accepted, then rejected with a broken configuration while
   the daemon keeps running), the catalog text in `journalctl -x`, SIGTERM -> exit 0;
5. upgrade: the daemon creates /var/lib/fieldhub/fieldhub.db, a device is created with
   fieldhubctl, the +test2 package is installed over the first, the device is still there
   (same generationId and keys, through fieldhubctl and in the store with the sqlite3 CLI);
6. dpkg --purge: every file is gone; the machine is left as it was (the fieldhub user,
   which Debian policy keeps on purge, is removed by the test if it created it).

Exit 77 (skip) when not root, or when fieldhub is already installed here.
"""

import json
import os
import pwd
import grp
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

SKIP = 77
SRCDIR = os.environ.get('FIELDHUB_SRCDIR') or os.path.realpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
UPGRADE_VERSION = '0.1.0+test2'
SECURITY_THRESHOLD = 20        # systemd-analyze's scale is 10x the printed exposure (1.7 -> 17)
GOOD_RATINGS = ('PERFECT', 'SAFE', 'OK')
MSG_STARTED = '28a98eb93a8a4f44a919eecacaf3cbd3'
MSG_RELOAD_FAILED = '30165a0d30c245c29eac7b04e5742701'
CATALOG_RELOAD_FAILED_SUBJECT = 'fieldhub configuration reload rejected; running configuration kept'
DEVICE_ID = 'pkgtest-dev1'

PATHS_THAT_MUST_NOT_EXIST = ['/etc/fieldhub', '/var/lib/fieldhub', '/var/log/fieldhub',
                             '/usr/sbin/fieldhubd', '/usr/bin/fieldhubctl']


def log(*a):
    print('[test_package]', *a, flush=True)


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)
    log('ok:', what)


def run(cmd, check_rc=True, timeout=120, **kw):
    kw.setdefault('stdout', subprocess.PIPE)
    kw.setdefault('stderr', subprocess.STDOUT)
    kw.setdefault('text', True)
    p = subprocess.run(cmd, timeout=timeout, **kw)
    if check_rc and p.returncode != 0:
        raise Failure('%s exited %d:\n%s' % (' '.join(cmd), p.returncode, p.stdout or ''))
    return p


def unit_path():
    for d in ('/lib/systemd/system', '/usr/lib/systemd/system'):
        if os.path.exists(os.path.join(d, 'fieldhub.service')):
            return os.path.join(d, 'fieldhub.service')
    return None


def as_fieldhub(cmd):
    """cmd run as the service user, with what the unit gives it: group fieldhub,
    supplementary group dialout, only CAP_NET_BIND_SERVICE, no new privileges."""
    return ['setpriv', '--reuid=fieldhub', '--regid=fieldhub', '--groups=dialout',
            '--inh-caps=-all,+net_bind_service', '--ambient-caps=-all,+net_bind_service',
            '--bounding-set=-all,+net_bind_service', '--no-new-privs', '--'] + cmd


# ----------------------------------------------------------------------------------------
# The runtime phase: runs inside `unshare --mount` (see Runtime.spawn below).
# ----------------------------------------------------------------------------------------

class Notify:
    """NOTIFY_SOCKET listener: collects every datagram the daemon sends."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.msgs = []
        self.cond = threading.Condition()
        t = threading.Thread(target=self._loop, daemon=True)
        t.start()

    def _loop(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self.cond:
                for line in data.decode(errors='replace').split('\n'):
                    if line:
                        self.msgs.append(line)
                self.cond.notify_all()

    def wait_for(self, pred, timeout, start=0):
        """Index of the first message at or after start matching pred, or None."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.msgs)):
                    if pred(self.msgs[i]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


class Runtime:
    """One fieldhubd run with its own /run, journald and notify socket."""

    def __init__(self, work, state_dir):
        self.work = work
        self.state_dir = state_dir
        self.journald = None
        self.daemon = None
        self.notify = None
        self.journal_dir = '/run/log/journal'

    def setup_namespace(self):
        # We are in a private mount namespace: a fresh /run hides nothing from the machine.
        run(['mount', '-t', 'tmpfs', '-o', 'mode=0755,nosuid,nodev', 'tmpfs', '/run'])
        os.makedirs('/run/systemd/journal')
        os.makedirs('/run/systemd/journald.conf.d')
        with open('/run/systemd/journald.conf.d/fieldhub-test.conf', 'w') as f:
            f.write('[Journal]\nStorage=volatile\nRateLimitBurst=0\nReadKMsg=no\n'
                    'ForwardToSyslog=no\nForwardToKMsg=no\nForwardToConsole=no\nForwardToWall=no\n')
        # What RuntimeDirectory=fieldhub / RuntimeDirectoryMode=0750 creates.
        os.makedirs('/run/fieldhub')
        os.chown('/run/fieldhub', pwd.getpwnam('fieldhub').pw_uid, grp.getgrnam('fieldhub').gr_gid)
        os.chmod('/run/fieldhub', 0o750)
        self.journald = subprocess.Popen(['/lib/systemd/systemd-journald'],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists('/run/systemd/journal/stdout'):
            if time.monotonic() > deadline or self.journald.poll() is not None:
                raise Failure('standalone systemd-journald did not start')
            time.sleep(0.05)

    def journal_stream(self):
        """A stdout stream to journald, as systemd gives a service (identifier fieldhubd)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect('/run/systemd/journal/stdout')
        s.shutdown(socket.SHUT_RD)
        s.sendall(b'fieldhubd\nfieldhub.service\n6\n0\n0\n0\n0\n')
        st = os.fstat(s.fileno())
        return s, '%d:%d' % (st.st_dev, st.st_ino)

    def start(self, extra_args=()):
        npath = os.path.join(self.work, 'notify-%d.sock' % time.monotonic_ns())
        self.notify = Notify(npath)
        stream, jstream = self.journal_stream()
        env = {
            'PATH': '/usr/sbin:/usr/bin:/sbin:/bin',
            'LANG': 'C.UTF-8',
            'NOTIFY_SOCKET': npath,
            'JOURNAL_STREAM': jstream,
            'WATCHDOG_USEC': '2000000',
            'RUNTIME_DIRECTORY': '/run/fieldhub',
            'STATE_DIRECTORY': self.state_dir,
            'LOGS_DIRECTORY': '/var/log/fieldhub',
            'CONFIGURATION_DIRECTORY': '/etc/fieldhub',
        }
        cmd = ['/usr/sbin/fieldhubd', '--config', '/etc/fieldhub/fieldhub.yaml']
        if self.state_dir != '/var/lib/fieldhub':
            cmd += ['--state-dir', self.state_dir]
        cmd += list(extra_args)
        # WATCHDOG_PID must be the daemon's pid: exec keeps the shell's pid.
        self.daemon = subprocess.Popen(
            ['/bin/sh', '-c', 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', 'sh']
            + as_fieldhub(cmd),
            env=env, stdin=subprocess.DEVNULL, stdout=stream.fileno(), stderr=stream.fileno(),
            cwd='/')
        stream.close()
        i = self.notify.wait_for(lambda m: m == 'READY=1', 15)
        if i is None:
            rc = self.daemon.poll()
            raise Failure('fieldhubd sent no READY=1 within 15 s (exit status %s); notify: %s\n%s'
                          % (rc, self.notify.msgs, self.journal_text()))
        log('ok: READY=1 (notify messages so far: %s)' % self.notify.msgs)

    def ctl(self, *args, timeout=30):
        return run(as_fieldhub(['/usr/bin/fieldhubctl', '--socket', '/run/fieldhub/admin.sock']
                               + list(args)), check_rc=False, timeout=timeout)

    def stop(self):
        n = len(self.notify.msgs)
        t0 = time.monotonic()
        self.daemon.send_signal(signal.SIGTERM)
        try:
            rc = self.daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise Failure('fieldhubd did not stop within 10 s of SIGTERM')
        took = time.monotonic() - t0
        check(rc == 0, 'SIGTERM: fieldhubd exited 0 (exit status %d, %.2f s)' % (rc, took))
        check(took <= 2.5, 'SIGTERM: stopped within 2 s (%.2f s)' % took)
        check(self.notify.wait_for(lambda m: m == 'STOPPING=1', 1, n) is not None,
              'SIGTERM: STOPPING=1 sent')
        self.daemon = None

    def journal_json(self, *matches):
        p = run(['journalctl', '-D', self.journal_dir, '-o', 'json', '--no-pager'] + list(matches),
                check_rc=False)
        out = []
        for line in p.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def journal_text(self):
        return run(['journalctl', '-D', self.journal_dir, '-o', 'short', '--no-pager'],
                   check_rc=False).stdout

    def wait_journal(self, pred, timeout=10, *matches):
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.journal_json(*matches) if pred(e)]
            if entries or time.monotonic() > deadline:
                return entries
            time.sleep(0.2)

    def teardown(self):
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        if self.journald is not None and self.journald.poll() is None:
            self.journald.terminate()
            try:
                self.journald.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.journald.kill()
                self.journald.wait()


def phase_run(work, state_dir):
    """Phase `run`: READY, reload accepted, reload rejected, catalog, clean stop."""
    rt = Runtime(work, state_dir)
    try:
        rt.setup_namespace()
        rt.start()
        n = len(rt.notify.msgs)
        check(any(m.startswith('STATUS=') for m in rt.notify.msgs), 'STATUS= sent at start')
        check(rt.notify.wait_for(lambda m: m == 'WATCHDOG=1', 5) is not None,
              'WATCHDOG=1 sent (WATCHDOG_USEC=2s)')
        st = os.stat('/run/fieldhub/admin.sock')
        check(stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660,
              'admin socket /run/fieldhub/admin.sock is a socket, mode 0660 (%o)'
              % stat.S_IMODE(st.st_mode))

        p = rt.ctl('status')
        check(p.returncode == 0, 'fieldhubctl status: exit 0\n' + p.stdout)

        p = rt.ctl('reload', '--wait')
        check(p.returncode == 0, 'fieldhubctl reload --wait (valid configuration): exit 0\n' + p.stdout)
        i = rt.notify.wait_for(lambda m: m == 'RELOADING=1', 5, n)
        check(i is not None, 'reload: RELOADING=1 sent')
        check(rt.notify.wait_for(lambda m: m == 'READY=1', 5, i) is not None,
              'reload: READY=1 sent again')

        # A broken configuration: bind-mounted over the installed one, in this namespace only.
        broken = os.path.join(work, 'broken.yaml')
        with open(broken, 'w') as f:
            f.write('hub:\n  host_name: gw.example.local\n  no_such_key_pkgtest: 1\n')
        os.chmod(broken, 0o644)
        run(['mount', '--bind', broken, '/etc/fieldhub/fieldhub.yaml'])
        try:
            p = rt.ctl('reload', '--wait')
            check(p.returncode != 0,
                  'fieldhubctl reload --wait (broken configuration): exit %d\n%s'
                  % (p.returncode, p.stdout))
            check('no_such_key_pkgtest' in p.stdout,
                  'rejected reload names the offending key on fieldhubctl\'s output')
            time.sleep(0.3)
            check(rt.daemon.poll() is None, 'fieldhubd keeps running after a rejected reload')
            p = rt.ctl('status')
            check(p.returncode == 0, 'fieldhubctl status after a rejected reload: exit 0')
        finally:
            run(['umount', '/etc/fieldhub/fieldhub.yaml'])

        # The journal: structured entries, MESSAGE_IDs, and their catalog text.
        started = rt.wait_journal(lambda e: e.get('MESSAGE_ID') == MSG_STARTED)
        check(started, 'journal: "started" entry with MESSAGE_ID=%s' % MSG_STARTED)
        check(started[0].get('SYSLOG_IDENTIFIER') == 'fieldhubd',
              'journal: SYSLOG_IDENTIFIER=fieldhubd (%s)' % started[0].get('SYSLOG_IDENTIFIER'))
        check(started[0].get('_UID') == str(pwd.getpwnam('fieldhub').pw_uid),
              'journal: logged by user fieldhub')
        check(any(k.startswith('FIELDHUB_') for e in rt.journal_json() for k in e),
              'journal: entries carry FIELDHUB_* fields')
        failed = rt.wait_journal(lambda e: e.get('MESSAGE_ID') == MSG_RELOAD_FAILED)
        check(failed, 'journal: rejected reload logged with MESSAGE_ID=%s' % MSG_RELOAD_FAILED)
        check(any('no_such_key_pkgtest' in str(e.get('MESSAGE'))
                  for e in rt.journal_json('SYSLOG_IDENTIFIER=fieldhubd', 'PRIORITY=3')),
              'journal: an error entry names the offending key of the rejected reload')
        run(['journalctl', '--update-catalog'])
        p = run(['journalctl', '-D', rt.journal_dir, '-x', '--no-pager',
                 'MESSAGE_ID=' + MSG_RELOAD_FAILED])
        check(CATALOG_RELOAD_FAILED_SUBJECT in p.stdout and 'Fix the file' in p.stdout,
              'journalctl -x shows the catalog text for the rejected reload')

        rt.stop()
    finally:
        rt.teardown()


def phase_store(work, action):
    """Phase `store-create` / `store-check`: the unit's default state dir /var/lib/fieldhub."""
    rt = Runtime(work, '/var/lib/fieldhub')
    saved = os.path.join(work, 'device-before-upgrade.json')
    try:
        rt.setup_namespace()
        rt.start()
        if action == 'store-create':
            p = rt.ctl('--json', 'device', 'create', DEVICE_ID)
            check(p.returncode == 0, 'fieldhubctl device create %s: exit 0\n%s' % (DEVICE_ID, p.stdout))
        p = rt.ctl('--json', 'device', 'show', DEVICE_ID)
        check(p.returncode == 0, '%s: fieldhubctl device show %s: exit 0\n%s' % (action, DEVICE_ID, p.stdout))
        dev = json.loads(p.stdout)
        if action == 'store-create':
            with open(saved, 'w') as f:
                json.dump(dev, f)
        else:
            with open(saved) as f:
                before = json.load(f)
            for k in ('deviceId', 'generationId', 'authentication'):
                check(dev.get(k) == before.get(k) and before.get(k) is not None,
                      'after the upgrade the device keeps its %s' % k)
        rt.stop()
    finally:
        rt.teardown()
    db = '/var/lib/fieldhub/fieldhub.db'
    check(os.path.exists(db), 'the store %s exists' % db)
    st = os.stat(db)
    check(stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == pwd.getpwnam('fieldhub').pw_uid,
          'the store is mode 0600, owned by fieldhub (%o)' % stat.S_IMODE(st.st_mode))
    p = run(as_fieldhub(['sqlite3', '-readonly', db,
                         "SELECT count(*) FROM devices WHERE %s = '%s';" % (id_column(db), DEVICE_ID)]))
    check(p.stdout.strip() == '1', '%s: device %s is in the store' % (action, DEVICE_ID))


def table_info(db):
    p = run(as_fieldhub(['sqlite3', '-readonly', '-json', db, 'PRAGMA table_info(devices);']))
    cols = json.loads(p.stdout or '[]')
    if not cols:
        raise Failure('the store has no devices table')
    return cols


def id_column(db):
    names = [c['name'] for c in table_info(db)]
    for cand in ('device_id', 'deviceId', 'id'):
        if cand in names:
            return cand
    raise Failure('devices table has no id column: %s' % names)


# ----------------------------------------------------------------------------------------
# The outer test (host mount namespace).
# ----------------------------------------------------------------------------------------

class Test:
    def __init__(self):
        self.work = tempfile.mkdtemp(prefix='fieldhub-pkgtest.')
        os.chmod(self.work, 0o755)
        self.user_existed = self._user_exists()
        self.group_existed = self._group_exists()
        self.catalog_had_fieldhub = self._catalog_lists_fieldhub()
        self.upgrade_build = None

    @staticmethod
    def _user_exists():
        try:
            pwd.getpwnam('fieldhub')
            return True
        except KeyError:
            return False

    @staticmethod
    def _group_exists():
        try:
            grp.getgrnam('fieldhub')
            return True
        except KeyError:
            return False

    @staticmethod
    def _catalog_lists_fieldhub():
        p = run(['journalctl', '--list-catalog'], check_rc=False)
        return MSG_STARTED in p.stdout

    @staticmethod
    def installed_version():
        p = run(['dpkg-query', '-W', '-f=${Status} ${Version}', 'fieldhub'], check_rc=False)
        if p.returncode == 0 and 'ok installed' in p.stdout:
            return p.stdout.split()[-1]
        return None

    def phase(self, name, *args, timeout=60):
        """Runs a runtime phase of this script in a private mount namespace."""
        proc = subprocess.Popen(['unshare', '--mount', '--propagation', 'private', '--',
                                 sys.executable, os.path.abspath(__file__), '--phase', name,
                                 self.work] + list(args))
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            # SIGTERM lets the phase stop its daemon and journald (they are not our children).
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        if rc != 0:
            raise Failure('phase %s failed (exit %d)' % (name, rc))

    def build(self):
        out1 = os.path.join(self.work, 'out1')
        t0 = time.monotonic()
        run([os.path.join(SRCDIR, 'packaging', 'build-deb.sh'), '--outdir', out1], timeout=600)
        log('ok: package built in %.0f s' % (time.monotonic() - t0))
        # The upgrade package builds while the first one is checked and run.
        out2 = os.path.join(self.work, 'out2')
        self.upgrade_log = open(os.path.join(self.work, 'build2.log'), 'w')
        self.upgrade_build = subprocess.Popen(
            [os.path.join(SRCDIR, 'packaging', 'build-deb.sh'), '--version', UPGRADE_VERSION,
             '--outdir', out2], stdout=self.upgrade_log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.deb1 = self._find_deb(out1, '0.1.0')

    @staticmethod
    def _find_deb(d, version):
        debs = [f for f in os.listdir(d) if f.startswith('fieldhub_') and f.endswith('.deb')
                and '_%s_' % version in f]
        if len(debs) != 1:
            raise Failure('expected one fieldhub_%s_*.deb in %s, found %s' % (version, d, os.listdir(d)))
        return os.path.join(d, debs[0])

    def lintian(self):
        p = run(['lintian', '--fail-on', 'error,warning', '--no-tag-display-limit', self.deb1],
                check_rc=False, timeout=180)
        tags = [l for l in p.stdout.splitlines() if re.match(r'^[EW]: ', l)]
        check(p.returncode == 0 and not tags, 'lintian: no errors or warnings%s' %
              ('' if not tags else ':\n' + '\n'.join(tags)))

    def install_and_check(self):
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        run(['dpkg', '-i', self.deb1], env=env)
        check(self.installed_version() is not None, 'dpkg -i: fieldhub installed')
        systemd_running = os.path.isdir('/run/systemd/system')
        if systemd_running:
            # The package enables and starts the service; it must not run beside the test's.
            p = run(['systemctl', 'is-enabled', 'fieldhub.service'], check_rc=False)
            check(p.stdout.strip() == 'enabled', 'fieldhub.service enabled on install')
            run(['systemctl', 'stop', 'fieldhub.service'], check_rc=False)

        def mode(path, want_mode, want_type=stat.S_ISREG, owner='root'):
            st = os.lstat(path)
            check(want_type(st.st_mode) and stat.S_IMODE(st.st_mode) == want_mode
                  and pwd.getpwuid(st.st_uid).pw_name == owner,
                  '%s: mode %o owner %s (found %o %s)' % (path, want_mode, owner,
                                                          stat.S_IMODE(st.st_mode),
                                                          pwd.getpwuid(st.st_uid).pw_name))
        mode('/usr/sbin/fieldhubd', 0o755)
        mode('/usr/bin/fieldhubctl', 0o755)
        mode('/etc/fieldhub', 0o755, stat.S_ISDIR)
        mode('/etc/fieldhub/conf.d', 0o755, stat.S_ISDIR)
        mode('/etc/fieldhub/fieldhub.yaml', 0o644)
        unit = unit_path()
        check(unit is not None, 'unit installed: %s' % unit)
        mode(unit, 0o644)
        mode('/usr/lib/systemd/catalog/fieldhub.catalog', 0o644)
        mode('/usr/lib/sysusers.d/fieldhub.conf', 0o644)
        mode('/usr/share/bash-completion/completions/fieldhubctl', 0o644)
        check(os.path.exists('/usr/share/doc/fieldhub/examples/demo.yaml'),
              'demo configuration in /usr/share/doc/fieldhub/examples/')
        for page in ('fieldhubd', 'fieldhubctl', 'fieldhub.yaml'):
            p = run(['man', '-w', page], check_rc=False)
            check(p.returncode == 0, 'man page %s: %s' % (page, p.stdout.strip()))
        conffiles = run(['dpkg-query', '-W', '-f=${Conffiles}', 'fieldhub']).stdout
        check('/etc/fieldhub/fieldhub.yaml' in conffiles, '/etc/fieldhub/fieldhub.yaml is a conffile')
        with open(os.path.join(SRCDIR, 'configs', 'fieldhub.yaml'), 'rb') as a, \
                open('/etc/fieldhub/fieldhub.yaml', 'rb') as b:
            check(a.read() == b.read(), '/etc/fieldhub/fieldhub.yaml is configs/fieldhub.yaml')

        pw = pwd.getpwnam('fieldhub')
        check(pw.pw_uid < 1000 and pw.pw_shell.endswith('nologin')
              and grp.getgrgid(pw.pw_gid).gr_name == 'fieldhub',
              'system user fieldhub (uid %d, group %s, shell %s)'
              % (pw.pw_uid, grp.getgrgid(pw.pw_gid).gr_name, pw.pw_shell))

        p = run(['/usr/sbin/fieldhubd', '--version'])
        check('0.1.0' in p.stdout, 'fieldhubd --version: %s' % p.stdout.strip())
        p = run(['/usr/bin/fieldhubctl', '--version'])
        check('0.1.0' in p.stdout, 'fieldhubctl --version: %s' % p.stdout.strip())
        p = run(as_fieldhub(['/usr/sbin/fieldhubd', '--check-config', '--config',
                             '/etc/fieldhub/fieldhub.yaml']), check_rc=False)
        check(p.returncode == 0, 'installed default configuration passes --check-config\n' + p.stdout)
        p = run(as_fieldhub(['/usr/bin/fieldhubctl', 'check-config', '/etc/fieldhub/fieldhub.yaml']),
                check_rc=False)
        check(p.returncode == 0, 'fieldhubctl check-config on it: exit 0\n' + p.stdout)

        # The unit.
        p = run(['systemd-analyze', 'verify', unit], check_rc=False)
        check(p.returncode == 0 and 'fieldhub' not in p.stdout,
              'systemd-analyze verify %s: clean\n%s' % (unit, p.stdout))
        p = run(['systemd-analyze', 'security', '--offline=true', '--no-pager',
                 '--threshold=%d' % SECURITY_THRESHOLD, unit], check_rc=False)
        m = re.search(r'Overall exposure level for fieldhub.service: ([0-9.]+) (\w+)', p.stdout)
        check(m is not None, 'systemd-analyze security printed an exposure level')
        log('SECURITY RATING: %s %s' % (m.group(1), m.group(2)))
        check(p.returncode == 0 and m.group(2) in GOOD_RATINGS,
              'systemd-analyze security --offline=true --threshold=%d: exposure %s %s'
              % (SECURITY_THRESHOLD, m.group(1), m.group(2)))

        # Completion loads (bash -n) and the catalog is known to journalctl (dpkg trigger).
        run(['bash', '-n', '/usr/share/bash-completion/completions/fieldhubctl'])
        run(['journalctl', '--update-catalog'])
        p = run(['journalctl', '--list-catalog'])
        check(MSG_STARTED in p.stdout, 'journalctl --list-catalog lists the fieldhub entries')

    def runtime(self):
        state = os.path.join(self.work, 'state')
        os.mkdir(state, 0o700)
        os.chown(state, pwd.getpwnam('fieldhub').pw_uid, grp.getgrnam('fieldhub').gr_gid)
        self.phase('run', state, timeout=90)

    def upgrade(self):
        # What StateDirectory=fieldhub / StateDirectoryMode=0700 creates.
        os.mkdir('/var/lib/fieldhub', 0o700)
        os.chown('/var/lib/fieldhub', pwd.getpwnam('fieldhub').pw_uid, grp.getgrnam('fieldhub').gr_gid)
        self.phase('store-create', timeout=60)

        t0 = time.monotonic()
        rc = self.upgrade_build.wait(timeout=600)
        self.upgrade_log.close()
        if rc != 0:
            with open(os.path.join(self.work, 'build2.log')) as f:
                raise Failure('upgrade package build failed:\n' + f.read()[-4000:])
        log('ok: upgrade package ready (waited %.0f s)' % (time.monotonic() - t0))
        deb2 = self._find_deb(os.path.join(self.work, 'out2'), UPGRADE_VERSION)
        run(['dpkg', '-i', deb2], env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))
        if os.path.isdir('/run/systemd/system'):
            run(['systemctl', 'stop', 'fieldhub.service'], check_rc=False)
        check(self.installed_version() == UPGRADE_VERSION,
              'upgraded to %s' % self.installed_version())
        st = os.stat('/var/lib/fieldhub')
        check(stat.S_IMODE(st.st_mode) == 0o700, 'upgrade kept /var/lib/fieldhub (0700)')
        self.phase('store-check', timeout=60)

    def purge(self):
        run(['dpkg', '--purge', 'fieldhub'], env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))
        check(self.installed_version() is None, 'dpkg --purge: fieldhub is gone')
        left = [p for p in PATHS_THAT_MUST_NOT_EXIST + [unit_path() or '',
                                                       '/usr/lib/systemd/catalog/fieldhub.catalog',
                                                       '/usr/lib/sysusers.d/fieldhub.conf']
                if p and os.path.lexists(p)]
        check(not left, 'purge removed every file and the state (left: %s)' % left)
        run(['journalctl', '--update-catalog'])
        check(not self._catalog_lists_fieldhub(), 'the catalog database no longer has fieldhub entries')

    def cleanup(self):
        """Leave the machine as it was, whatever happened."""
        if self.upgrade_build is not None and self.upgrade_build.poll() is None:
            # The whole build (its own process group) stops; build-deb.sh then removes its
            # temporary tree.
            os.killpg(self.upgrade_build.pid, signal.SIGTERM)
            try:
                self.upgrade_build.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.upgrade_build.pid, signal.SIGKILL)
                self.upgrade_build.wait()
        if self.installed_version() is not None:
            log('cleanup: purging fieldhub')
            run(['dpkg', '--purge', 'fieldhub'], check_rc=False,
                env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))
        for d in ('/var/lib/fieldhub', '/var/log/fieldhub', '/etc/fieldhub'):
            if os.path.lexists(d):
                log('cleanup: removing', d)
                shutil.rmtree(d, ignore_errors=True)
        # Debian keeps system users on purge; the test removes the one it caused.
        if not self.user_existed and self._user_exists():
            run(['userdel', 'fieldhub'], check_rc=False)
        if not self.group_existed and self._group_exists():
            run(['groupdel', 'fieldhub'], check_rc=False)
        if not self.catalog_had_fieldhub and self._catalog_lists_fieldhub():
            run(['journalctl', '--update-catalog'], check_rc=False)
        shutil.rmtree(self.work, ignore_errors=True)


def main():
    def on_signal(signum, frame):
        raise SystemExit('killed by signal %d' % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if len(sys.argv) >= 4 and sys.argv[1] == '--phase':
        name, work = sys.argv[2], sys.argv[3]
        try:
            if name == 'run':
                phase_run(work, sys.argv[4])
            elif name in ('store-create', 'store-check'):
                phase_store(work, name)
            else:
                raise Failure('unknown phase ' + name)
        except Failure as e:
            log('FAIL:', e)
            return 1
        return 0

    if os.geteuid() != 0:
        print('SKIP: the packaging test installs a package and needs root')
        return SKIP
    if Test.installed_version() is not None:
        print('SKIP: fieldhub is already installed on this machine; the test will not touch it')
        return SKIP
    present = [p for p in PATHS_THAT_MUST_NOT_EXIST if os.path.lexists(p)]
    if present:
        print('SKIP: %s exist(s) without the package; the test will not touch them' % present)
        return SKIP
    missing = [t for t in ('dpkg-buildpackage', 'lintian', 'systemd-analyze', 'journalctl',
                           'setpriv', 'unshare', 'sqlite3', 'man')
               if shutil.which(t) is None]
    if missing or not os.path.exists('/lib/systemd/systemd-journald'):
        print('FAIL: missing tools %s: run packaging/install-deps.sh' % missing)
        return 1

    t = Test()
    t0 = time.monotonic()
    try:
        t.build()
        t.lintian()
        t.install_and_check()
        t.runtime()
        t.upgrade()
        t.purge()
    except Failure as e:
        log('FAIL:', e)
        return 1
    finally:
        t.cleanup()
        log('took %.0f s' % (time.monotonic() - t0))
    log('PASS')
    return 0


if __name__ == '__main__':
    sys.exit(main())
