/* A probe run inside builds by tests/tests/containment.rs: it tries what a hostile provisioner
 * would, with the system calls themselves (busybox has no applet for most of them), and prints
 * one line per attempt: "NAME ok" if it worked, "NAME errno N (TEXT)" if the kernel refused.
 * Linked statically (gcc -static), so that it runs in any image.
 *
 *   escape-probe handle DIR          open_by_handle_at of inode 2 (the root directory of DIR's
 *                                    filesystem: the "shocker" escape), listing what it opens
 *   escape-probe calls               the refused system calls, one line each
 *   escape-probe capture MARKER SECS packet socket on every interface; "capture seen" if a
 *                                    frame holding MARKER passes within SECS seconds
 *   escape-probe send MARKER SECS    UDP datagrams holding MARKER to 127.0.0.1:9 for SECS s
 *   escape-probe recvfd SOCKET FILE...
 *                                    a descriptor received over the Unix socket SOCKET (as a
 *                                    host process hands one in), then each FILE opened
 *                                    relative to it: "open FILE ok" and its first line
 *   escape-probe recvfd-connect SOCKET
 *                                    a descriptor of a socket received over SOCKET, connected
 *                                    to through /proc/self/fd
 *   escape-probe disk                the build's own disk in /dev/disk/by-uuid: read (and its
 *                                    ext4 magic), opened for writing, detached (LOOP_CLR_FD),
 *                                    asked its backing file (LOOP_GET_STATUS64), removed,
 *                                    its mode changed
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void said(const char *name, long rc) {
    if (rc >= 0)
        printf("%s ok\n", name);
    else
        printf("%s errno %d (%s)\n", name, errno, strerror(errno));
    fflush(stdout);
}

static int handle(const char *dir) {
    int mount_fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (mount_fd < 0) {
        said("open-mount-dir", -1);
        return 1;
    }
    /* struct file_handle with an ext4/xfs FILEID_INO32_GEN handle for inode 2. */
    struct {
        unsigned int handle_bytes;
        int handle_type;
        unsigned int ino, gen;
    } h = {8, 1, 2, 0};
    long fd = syscall(SYS_open_by_handle_at, mount_fd, &h, O_RDONLY | O_DIRECTORY);
    said("open_by_handle_at", fd);
    if (fd >= 0) {
        DIR *d = fdopendir((int)fd);
        struct dirent *e;
        while (d && (e = readdir(d)))
            printf("escaped-entry %s\n", e->d_name);
    }
    return 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int capture(const char *marker, int secs) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    said("packet-socket", s);
    if (s < 0)
        return 0;
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    double end = now() + secs;
    char buf[65536];
    while (now() < end) {
        ssize_t n = recv(s, buf, sizeof buf, 0);
        if (n > 0 && memmem(buf, (size_t)n, marker, strlen(marker))) {
            printf("capture seen\n");
            return 0;
        }
    }
    printf("capture nothing\n");
    return 0;
}

static int send_marker(const char *marker, int secs) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(9)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    double end = now() + secs;
    while (now() < end) {
        sendto(s, marker, strlen(marker), 0, (struct sockaddr *)&to, sizeof to);
        usleep(20000);
    }
    return 0;
}

static int calls(void) {
    char payload[] = "secret";
    /* The host root user's keyring: shared by every root process of the host. */
    said("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -4 /* @u */, 0));
    said("add_key", syscall(SYS_add_key, "user", "amidala-probe", payload, sizeof payload, -4));
    said("request_key", syscall(SYS_request_key, "user", "amidala-probe", NULL, 0));
    long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid == 0)
        _exit(0);
    said("clone-user", pid);
    said("clone3", syscall(SYS_clone3, NULL, 0));
    said("bpf", syscall(SYS_bpf, 0, NULL, 0));
    said("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    said("userfaultfd", syscall(SYS_userfaultfd, 0));
    said("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    said("open_tree", syscall(SYS_open_tree, AT_FDCWD, "/", 1));
    said("init_module", syscall(SYS_init_module, NULL, 0, ""));
    said("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    said("name_to_handle_at", syscall(SYS_name_to_handle_at, AT_FDCWD, "/", NULL, NULL, 0));
    said("setns", syscall(SYS_setns, 0, 0));
    said("syslog", syscall(SYS_syslog, 3, NULL, 0));
    /* Last: it would change what the calls above may do. */
    said("unshare-user", syscall(SYS_unshare, CLONE_NEWUSER));
    return 0;
}

/* Connects to the Unix socket PATH and receives one descriptor; -1 if none came. */
static int receive_fd(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un to = {.sun_family = AF_UNIX};
    strncpy(to.sun_path, path, sizeof to.sun_path - 1);
    if (connect(s, (struct sockaddr *)&to, sizeof to) < 0) {
        said("connect", -1);
        return -1;
    }
    char byte;
    struct iovec iov = {&byte, 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    long n = recvmsg(s, &msg, 0);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    int fd = -1;
    if (n > 0 && c && c->cmsg_type == SCM_RIGHTS)
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
    printf("received %s\n", fd >= 0 ? "ok" : "nothing");
    return fd;
}

static int recvfd(const char *path, int count, char **files) {
    int dir = receive_fd(path);
    if (dir < 0)
        return 0;
    for (int i = 0; i < count; i++) {
        char name[300];
        snprintf(name, sizeof name, "open %s", files[i]);
        int fd = openat(dir, files[i], O_RDONLY);
        said(name, fd);
        if (fd >= 0) {
            char line[200] = {0};
            read(fd, line, sizeof line - 1);
            line[strcspn(line, "\n")] = 0;
            printf("first-line %s\n", line);
        }
    }
    return 0;
}

static int recvfd_connect(const char *path) {
    int fd = receive_fd(path);
    if (fd < 0)
        return 0;
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un to = {.sun_family = AF_UNIX};
    snprintf(to.sun_path, sizeof to.sun_path, "/proc/self/fd/%d", fd);
    said("connect-passed", connect(s, (struct sockaddr *)&to, sizeof to));
    return 0;
}

static int disk(void) {
    DIR *d = opendir("/dev/disk/by-uuid");
    struct dirent *e;
    char path[512] = "";
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.')
            snprintf(path, sizeof path, "/dev/disk/by-uuid/%s", e->d_name);
    if (!*path) {
        printf("disk none\n");
        return 0;
    }
    int fd = open(path, O_RDONLY);
    said("disk-read", fd);
    unsigned char magic[2] = {0, 0};
    if (fd >= 0 && pread(fd, magic, 2, 1080) == 2 && magic[0] == 0x53 && magic[1] == 0xEF)
        printf("disk-ext4-magic ok\n");
    said("disk-write", open(path, O_RDWR));
    char status[256];
    said("LOOP_GET_STATUS64", fd < 0 ? -1 : ioctl(fd, 0x4C05, status));
    said("LOOP_CLR_FD", fd < 0 ? -1 : ioctl(fd, 0x4C01, 0));
    said("disk-chmod", chmod(path, 0666));
    said("disk-unlink", unlink(path));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "disk"))
        return disk();
    if (argc == 3 && !strcmp(argv[1], "handle"))
        return handle(argv[2]);
    if (argc == 2 && !strcmp(argv[1], "calls"))
        return calls();
    if (argc == 4 && !strcmp(argv[1], "capture"))
        return capture(argv[2], atoi(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "send"))
        return send_marker(argv[2], atoi(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "recvfd"))
        return recvfd(argv[2], argc - 3, argv + 3);
    if (argc == 3 && !strcmp(argv[1], "recvfd-connect"))
        return recvfd_connect(argv[2]);
    fprintf(stderr, "usage: escape-probe handle DIR | calls | capture MARKER SECS | send MARKER SECS | "
                    "recvfd SOCKET FILE... | recvfd-connect SOCKET | disk\n");
    return 2;
}
