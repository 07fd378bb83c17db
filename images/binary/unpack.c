/*
 * libedgerun-unpack.so: inflate the frozen agent's zlib pack before Python starts.
 *
 * staticx can only compress its whole archive with xz, which decompresses at about
 * 60-70 MB/s here: 0.10 s for libpython alone at every start. The build
 * (images/binary/staticx_onedir.py) therefore takes the large files the agent needs
 * at start (libpython, base_library.zip, ...) out of the xz stream and stores them in
 * one zlib pack, `edgerun-agent.zpack`, that xz keeps as stored chunks; zlib inflates
 * about five times faster than xz. This library is a DT_NEEDED entry of the
 * PyInstaller bootloader (like staticx's own libnssfix.so), so its constructor runs
 * in the bootloader's process before main() opens libpython: it inflates every
 * member beside the program, in the staticx directory, and removes the pack.
 *
 * Everything after the magic is XORed with an xorshift64* key stream (seed
 * WHITEN_SEED): zlib's output is still 1-2 % compressible, so xz would code it
 * symbol by symbol (0.04 s for 3 MB) instead of storing it; whitened, it stores it.
 *
 * Pack format (little-endian): the 8 bytes "ERZPACK1", then for each member a
 * header of u32 name length, u32 mode, u64 size, u64 compressed size, the name
 * (relative, no "..") and the zlib stream; a name length of 0 ends the pack.
 * Any failure is one line on stderr and exit status 127: the agent cannot run
 * from an incomplete folder.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define PACK_NAME "edgerun-agent.zpack"
#define MAGIC "ERZPACK1"
#define WHITEN_SEED 0x9E3779B97F4A7C15ULL

static void whiten(unsigned char *data, size_t size)
{
    uint64_t x = WHITEN_SEED;
    for (size_t at = 0; at < size; at += 8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        uint64_t key = x * 0x2545F4914F6CDD1DULL;
        for (size_t i = 0; i < 8 && at + i < size; i++)
            data[at + i] ^= (unsigned char)(key >> (8 * i));
    }
}

static void die(const char *what, const char *name, const char *why)
{
    fprintf(stderr, "edgerun-agent: cannot unpack %s: %s: %s\n", name, what, why);
    _exit(127);
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static void make_parents(char *path, size_t skip)
{
    for (char *slash = strchr(path + skip, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            die("mkdir", path, strerror(errno));
        *slash = '/';
    }
}

static void write_all(int fd, const unsigned char *data, size_t size, const char *name)
{
    while (size > 0) {
        ssize_t done = write(fd, data, size);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            die("write", name, strerror(errno));
        }
        data += done;
        size -= (size_t)done;
    }
}

/* Inflate through a buffer mapped for the purpose and unmapped after: the bootloader's
 * process becomes the agent, and a large malloc (the heap it leaves, glibc's raised mmap
 * threshold after freeing a large block) or a static buffer would stay resident in it.
 * Small writes: the page cache (Linux 6.x, large folios) keeps a file written in large
 * writes in large folios, which are mapped whole when the library is loaded; written
 * at once, libpython alone was 0.4 MiB more resident than written in 16 KiB pieces. */
#define BUFFER_SIZE (16 * 1024)
static unsigned char *buffer;

static void inflate_to(int fd, const unsigned char *z, uint64_t z_size, uint64_t raw_size,
                       const char *name)
{
    z_stream stream;
    memset(&stream, 0, sizeof stream);
    if (inflateInit(&stream) != Z_OK)
        die("inflate", name, "cannot start zlib");
    uint64_t in_left = z_size, written = 0;
    int rc = Z_OK;
    while (rc != Z_STREAM_END) {
        if (stream.avail_in == 0 && in_left > 0) {
            uInt chunk = in_left > (1u << 30) ? (1u << 30) : (uInt)in_left;
            stream.next_in = (unsigned char *)(uintptr_t)(z + (z_size - in_left));
            stream.avail_in = chunk;
            in_left -= chunk;
        }
        stream.next_out = buffer;
        stream.avail_out = BUFFER_SIZE;
        rc = inflate(&stream, Z_NO_FLUSH);
        if (rc != Z_OK && rc != Z_STREAM_END)
            die("inflate", name, stream.msg ? stream.msg : zError(rc));
        size_t got = BUFFER_SIZE - stream.avail_out;
        if (got == 0 && rc == Z_OK && stream.avail_in == 0 && in_left == 0)
            die("inflate", name, "truncated");
        if (written + got > raw_size)
            die("inflate", name, "wrong size");
        write_all(fd, buffer, got, name);
        written += got;
    }
    inflateEnd(&stream);
    if (written != raw_size || stream.avail_in != 0 || in_left != 0)
        die("inflate", name, "wrong size");
}

static void unpack(const char *dir, const unsigned char *pack, size_t size)
{
    size_t at = sizeof MAGIC - 1;
    if (size < at || memcmp(pack, MAGIC, at) != 0)
        die("read", PACK_NAME, "not a pack");
    for (;;) {
        if (size - at < 24)
            die("read", PACK_NAME, "truncated");
        uint32_t name_len = le32(pack + at);
        uint32_t mode = le32(pack + at + 4);
        uint64_t raw_size = le64(pack + at + 8);
        uint64_t z_size = le64(pack + at + 16);
        at += 24;
        if (name_len == 0)
            return;
        if (name_len >= PATH_MAX / 2 || size - at < name_len || size - at - name_len < z_size ||
            raw_size > (uint64_t)SIZE_MAX / 2)
            die("read", PACK_NAME, "truncated or corrupt");
        char name[PATH_MAX / 2];
        memcpy(name, pack + at, name_len);
        name[name_len] = '\0';
        at += name_len;
        if (name[0] == '/' || strstr(name, "..") != NULL || memchr(name, '\0', name_len) != NULL)
            die("read", PACK_NAME, "bad member name");
        char path[PATH_MAX];
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path)
            die("open", name, "path too long");
        make_parents(path, strlen(dir) + 1);

        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode & 07777);
        if (fd < 0)
            die("open", name, strerror(errno));
        inflate_to(fd, pack + at, z_size, raw_size, name);
        at += z_size;
        if (close(fd) != 0)
            die("close", name, strerror(errno));
    }
}

__attribute__((constructor)) static void edgerun_unpack(void)
{
    char dir[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (len <= 0)
        die("readlink", "/proc/self/exe", strerror(errno));
    dir[len] = '\0';
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        return;
    *slash = '\0';
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, PACK_NAME) >= sizeof path)
        die("open", PACK_NAME, "path too long");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return; /* unpacked already, or a folder that was never packed */
        die("open", PACK_NAME, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0)
        die("stat", PACK_NAME, strerror(errno));
    unsigned char *pack = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (pack == MAP_FAILED)
        die("mmap", PACK_NAME, strerror(errno));
    close(fd);
    if ((size_t)st.st_size > sizeof MAGIC - 1)
        whiten(pack + sizeof MAGIC - 1, (size_t)st.st_size - (sizeof MAGIC - 1));
    buffer = mmap(NULL, BUFFER_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buffer == MAP_FAILED)
        die("mmap", PACK_NAME, strerror(errno));
    unpack(dir, pack, (size_t)st.st_size);
    munmap(buffer, BUFFER_SIZE);
    munmap(pack, (size_t)st.st_size);
    if (unlink(path) != 0)
        die("unlink", PACK_NAME, strerror(errno));
}
