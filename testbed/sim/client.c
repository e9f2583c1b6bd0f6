/*
 * The client half of a simulated NixOS host's systemctl, systemd-run, nix-env, nix-store and
 * hostname (rebuild test bed). Not an imitation itself: it hands this process (argv,
 * environment, umask, ignored and blocked signals, working directory, standard input, output
 * and error) to the host's simulator, testbed/sim/server.py, over $SIM_ROOT/sim/server.sock,
 * forwards the signals it gets (HUP, INT, QUIT, TERM, USR1, USR2) to the command, and exits as
 * the command did: the same exit code, or killed by the same signal. The wire format is in
 * server.py's docstring.
 *
 * The program's name is the one it was executed as (a link in the host's PATH); SIM_ROOT comes
 * from the environment, else from the .sim-root marker next to that link (env -i and sudo drop
 * SIM_ROOT). When neither names the host, or its simulator does not answer, it runs the Python
 * shim of the same name instead (py/NAME next to this binary), which is slower but the same.
 *
 * The test bed compiles it with the system's cc when one is installed (testbed/hostbin.py);
 * without one the shims are client.py, the same client in Python.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static volatile sig_atomic_t child_pid;
static volatile sig_atomic_t pending_sig;
static const int forwarded[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

static void forward(int sig) {
    if (child_pid > 0)
        kill(child_pid, sig);
    else
        pending_sig = sig;
}

/* Run the Python shim of the same name (next to this binary, in py/). */
static void fallback(const char *name, char **argv, const char *root) {
    char self[PATH_MAX], path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL) {
            *slash = '\0';
            if (snprintf(path, sizeof path, "%s/py/%s", self, name) < (int)sizeof path) {
                if (root != NULL && getenv("SIM_ROOT") == NULL)
                    setenv("SIM_ROOT", root, 1);
                argv[0] = path;
                execv(path, argv);
            }
        }
    }
    fprintf(stderr, "rebuild test bed: %s: cannot run its Python shim: %s\n", name,
            strerror(errno));
    _exit(127);
}

/* SIM_ROOT from the environment, else from the marker next to the executed link. */
static char *find_root(const char *execfn) {
    static char root[PATH_MAX];
    const char *env = getenv("SIM_ROOT");
    if (env != NULL && *env != '\0') {
        if (strlen(env) >= sizeof root)
            return NULL;
        strcpy(root, env);
        return root;
    }
    char marker[PATH_MAX];
    const char *slash = strrchr(execfn, '/');
    int dir_len = slash == NULL ? 1 : (int)(slash - execfn);
    const char *dir = slash == NULL ? "." : execfn;
    if (snprintf(marker, sizeof marker, "%.*s/.sim-root", dir_len, dir) >= (int)sizeof marker)
        return NULL;
    int fd = open(marker, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    ssize_t n = read(fd, root, sizeof root - 1);
    close(fd);
    if (n <= 0)
        return NULL;
    root[n] = '\0';
    root[strcspn(root, "\n")] = '\0';
    return root[0] != '\0' ? root : NULL;
}

static int read_int(int fd, int32_t *out) {
    char buf[sizeof *out];
    size_t got = 0;
    while (got < sizeof buf) {
        ssize_t n = read(fd, buf + got, sizeof buf - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    memcpy(out, buf, sizeof buf);
    return 0;
}

/* Append one NUL-terminated field to the request. */
static void put(char **buf, size_t *len, size_t *cap, const char *field) {
    size_t n = strlen(field) + 1;
    if (*len + n > *cap) {
        while (*len + n > *cap)
            *cap *= 2;
        *buf = realloc(*buf, *cap);
        if (*buf == NULL) {
            perror("rebuild test bed: client");
            _exit(1);
        }
    }
    memcpy(*buf + *len, field, n);
    *len += n;
}

int main(int argc, char **argv) {
    /* which of 0, 1, 2 are open: before any descriptor of ours can take a closed one's number */
    int fds[4], nfds = 0, open_std = 0;
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) >= 0) {
            fds[nfds++] = fd;
            open_std |= 1 << fd;
        }
    const char *execfn = (const char *)getauxval(AT_EXECFN);
    if (execfn == NULL || *execfn == '\0')
        execfn = argv[0];
    const char *name = strrchr(execfn, '/');
    name = name == NULL ? execfn : name + 1;
    char *root = find_root(execfn);
    if (root == NULL)
        fallback(name, argv, NULL);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/sim/server.sock", root) >=
        (int)sizeof addr.sun_path)
        fallback(name, argv, root);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        fallback(name, argv, root);

    /* what else this process is: working directory, umask, signals */
    int cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0)
        fallback(name, argv, root);
    fds[nfds++] = cwd;
    mode_t mask = umask(0);
    umask(mask);
    uint64_t ignored = 0, blocked = 0;
    sigset_t current;
    sigprocmask(SIG_BLOCK, NULL, &current);
    for (int sig = 1; sig <= 64; sig++) {
        struct sigaction old;
        if (sigaction(sig, NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            ignored |= UINT64_C(1) << (sig - 1);
        if (sigismember(&current, sig) == 1)
            blocked |= UINT64_C(1) << (sig - 1);
    }

    size_t cap = 4096, len = 8;
    char *buf = malloc(cap), num[32];
    if (buf == NULL)
        fallback(name, argv, root);
    put(&buf, &len, &cap, name);
    put(&buf, &len, &cap, execfn);
    put(&buf, &len, &cap, root);
    snprintf(num, sizeof num, "%o", (unsigned)mask);
    put(&buf, &len, &cap, num);
    snprintf(num, sizeof num, "%d", open_std);
    put(&buf, &len, &cap, num);
    snprintf(num, sizeof num, "%llu", (unsigned long long)ignored);
    put(&buf, &len, &cap, num);
    snprintf(num, sizeof num, "%llu", (unsigned long long)blocked);
    put(&buf, &len, &cap, num);
    snprintf(num, sizeof num, "%d", argc - 1);
    put(&buf, &len, &cap, num);
    for (int i = 1; i < argc; i++)
        put(&buf, &len, &cap, argv[i]);
    for (char **e = environ; *e != NULL; e++)
        put(&buf, &len, &cap, *e);
    uint32_t payload = (uint32_t)(len - 8);
    memcpy(buf, "RBS1", 4);
    memcpy(buf + 4, &payload, 4);

    union {
        char space[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds)};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    ssize_t sent;
    do
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0)
        fallback(name, argv, root);
    for (size_t off = (size_t)sent; off < len;) {
        ssize_t n = send(sock, buf + off, len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            fprintf(stderr, "rebuild test bed: %s: lost the host's simulator\n", name);
            return 1;
        }
        off += (size_t)n;
    }
    close(cwd);
    free(buf);

    /* from here the command runs: our signals are its signals */
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) {
        if (ignored & (UINT64_C(1) << (forwarded[i] - 1)))
            continue;
        struct sigaction act = {.sa_handler = forward};
        sigemptyset(&act.sa_mask);
        sigaction(forwarded[i], &act, NULL);
    }
    int32_t pid, status;
    if (read_int(sock, &pid) < 0) {
        fprintf(stderr, "rebuild test bed: %s: the host's simulator did not run it\n", name);
        return 1;
    }
    child_pid = pid;
    if (pending_sig != 0)
        kill(pid, pending_sig);
    if (read_int(sock, &status) < 0) {
        fprintf(stderr, "rebuild test bed: %s: lost the host's simulator\n", name);
        return 1;
    }
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        raise(sig);
        return 128 + sig;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
