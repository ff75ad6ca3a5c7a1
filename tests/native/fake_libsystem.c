/* A stand-in, built on Linux, for the few macOS libSystem and libdispatch calls that
 * forksafe's Darwin backend makes through ctypes (src/forksafe/_platform/_darwin.py,
 * class _Mach). The data is made up; the calling conventions are macOS's: the same
 * signatures, structure layouts and in/out element counts, and the same error codes
 * for a too-small buffer, a vanished thread or an unmapped address. Loading it lets
 * the ctypes layer run for real on Linux, and it counts the Mach resources handed out
 * (thread port rights, the thread array) so a test can see that all were given back.
 *
 * Built as "libdispatch.dylib" so that it is also the process's libdispatch: it
 * exports dispatch_queue_offsets and _dispatch_is_multithreaded. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int kern_return_t;
typedef uint32_t mach_port_t;
typedef uint32_t mach_msg_type_number_t;

#define KERN_SUCCESS 0
#define KERN_INVALID_ADDRESS 1
#define KERN_INVALID_ARGUMENT 4
#define KERN_FAILURE 5
#define MACH_SEND_INVALID_DEST 0x10000003
#define THREAD_BASIC_INFO 3
#define THREAD_IDENTIFIER_INFO 4
#define ESRCH 3

mach_port_t mach_task_self_ = 0x103;

/* -- dyld ---------------------------------------------------------------------------- */

struct mach_header_64 {
    uint32_t magic;
    int32_t cputype, cpusubtype;
    uint32_t filetype, ncmds, sizeofcmds, flags, reserved;
};
struct segment_command_64 {
    uint32_t cmd, cmdsize;
    char segname[16];
    uint64_t vmaddr, vmsize, fileoff, filesize;
    int32_t maxprot, initprot;
    uint32_t nsects, flags;
};
struct image {
    struct mach_header_64 header;
    struct segment_command_64 text;
};

#define IMAGES 3
static struct image images[IMAGES];
static char dispatch_path[4096];
static const char *names[IMAGES] = {"/fake/bin/python3", dispatch_path, "/usr/lib/libsqlite3.dylib"};

uint32_t _dyld_image_count(void) { return IMAGES; }
const char *_dyld_get_image_name(uint32_t i) { return i < IMAGES ? names[i] : NULL; }
const struct mach_header_64 *_dyld_get_image_header(uint32_t i) {
    return i < IMAGES ? &images[i].header : NULL;
}
intptr_t _dyld_get_image_vmaddr_slide(uint32_t i) { return i < IMAGES ? 0x1000 * (intptr_t)(i + 1) : 0; }

/* -- libdispatch --------------------------------------------------------------------- */

struct fake_queue {
    char pad[0x48];
    const char *label;
};
static char label[64] = "com.apple.root.default-qos";
static struct fake_queue global_queue = {{0}, label};

struct dispatch_queue_offsets_s {
    uint16_t dqo_version, dqo_label, dqo_label_size;
};
const struct dispatch_queue_offsets_s dispatch_queue_offsets = {
    6, offsetof(struct fake_queue, label), sizeof(const char *)};

static int multithreaded = 0;
/* Really `bool _dispatch_is_multithreaded(void)`: only the low byte of the result is
 * defined. This one leaves garbage above it, as a caller must expect. */
int _dispatch_is_multithreaded(void) { return 0x7700 | multithreaded; }
void fake_set_multithreaded(int on) { multithreaded = on; }

/* -- threads ------------------------------------------------------------------------- */

struct thread_basic_info {
    int32_t user_time[2], system_time[2];
    int32_t cpu_usage, policy, run_state, flags, suspend_count, sleep_time;
};
struct thread_identifier_info {
    uint64_t thread_id, thread_handle, dispatch_qaddr;
};

/* Port 0x1001: "worker-1", running; 0x1002: unnamed, serving global_queue;
 * 0x1003: ends between task_threads and thread_info. */
static int fake_pthreads[2];
static void *slot_idle = NULL;
static void *slot_serving = &global_queue;
static int rights = 0, arrays = 0, fail_listing = 0;
static mach_port_t *handed_out = NULL;
static mach_msg_type_number_t handed_count = 0;

void fake_fail_task_threads(int on) { fail_listing = on; }
int fake_outstanding(void) { return rights + arrays; }

kern_return_t task_threads(mach_port_t task, mach_port_t **list, mach_msg_type_number_t *count) {
    if (task != mach_task_self_)
        return MACH_SEND_INVALID_DEST;
    if (fail_listing)
        return KERN_FAILURE;
    mach_port_t *ports = malloc(3 * sizeof *ports);
    ports[0] = 0x1001;
    ports[1] = 0x1002;
    ports[2] = 0x1003;
    *list = ports;
    *count = 3;
    handed_out = ports;
    handed_count = 3;
    rights += 3;
    arrays += 1;
    return KERN_SUCCESS;
}

kern_return_t thread_info(mach_port_t thread, int flavor, int *info, mach_msg_type_number_t *count) {
    if (thread == 0x1003 || (thread != 0x1001 && thread != 0x1002))
        return MACH_SEND_INVALID_DEST;
    if (flavor == THREAD_BASIC_INFO) {
        if (*count < sizeof(struct thread_basic_info) / 4)
            return KERN_INVALID_ARGUMENT;
        struct thread_basic_info *basic = (struct thread_basic_info *)info;
        memset(basic, 0, sizeof *basic);
        basic->run_state = thread == 0x1001 ? 1 : 3;
        *count = sizeof *basic / 4;
        return KERN_SUCCESS;
    }
    if (flavor == THREAD_IDENTIFIER_INFO) {
        if (*count < sizeof(struct thread_identifier_info) / 4)
            return KERN_INVALID_ARGUMENT;
        struct thread_identifier_info *ident = (struct thread_identifier_info *)info;
        ident->thread_id = 0x5000 + thread;
        ident->thread_handle = 0;
        ident->dispatch_qaddr = (uint64_t)(uintptr_t)(thread == 0x1001 ? &slot_idle : &slot_serving);
        *count = sizeof *ident / 4;
        return KERN_SUCCESS;
    }
    return KERN_INVALID_ARGUMENT;
}

kern_return_t mach_port_deallocate(mach_port_t task, mach_port_t name) {
    if (task != mach_task_self_)
        return MACH_SEND_INVALID_DEST;
    if (name < 0x1001 || name > 0x1003 || rights == 0)
        return KERN_INVALID_ARGUMENT;
    rights -= 1;
    return KERN_SUCCESS;
}

kern_return_t vm_deallocate(mach_port_t task, uintptr_t address, size_t size) {
    if (task != mach_task_self_)
        return MACH_SEND_INVALID_DEST;
    if (address != (uintptr_t)handed_out || size != handed_count * sizeof(mach_port_t))
        return KERN_INVALID_ARGUMENT;
    free(handed_out);
    handed_out = NULL;
    arrays -= 1;
    return KERN_SUCCESS;
}

void *pthread_from_mach_thread_np(mach_port_t thread) {
    if (thread == 0x1001)
        return &fake_pthreads[0];
    if (thread == 0x1002)
        return &fake_pthreads[1];
    return NULL;
}

/* Like macOS: the id of a pthread libpthread knows, ESRCH for any other handle. */
int pthread_threadid_np(void *thread, uint64_t *thread_id) {
    if (thread == &fake_pthreads[0])
        *thread_id = 7001;
    else if (thread == &fake_pthreads[1])
        *thread_id = 7002;
    else
        return ESRCH;
    return 0;
}

int pthread_getname_np(void *thread, char *name, size_t size) {
    const char *value;
    if (thread == &fake_pthreads[0])
        value = "worker-1";
    else if (thread == &fake_pthreads[1])
        value = "";
    else
        return ESRCH;
    strncpy(name, value, size - 1);
    name[size - 1] = '\0';
    return 0;
}

/* -- memory -------------------------------------------------------------------------- */

static int readable(uint64_t address, uint64_t size) {
    const struct {
        const void *start;
        size_t size;
    } regions[] = {
        {images, sizeof images},
        {&global_queue, sizeof global_queue},
        {label, sizeof label},
        {&slot_idle, sizeof slot_idle},
        {&slot_serving, sizeof slot_serving},
        {&dispatch_queue_offsets, sizeof dispatch_queue_offsets},
    };
    for (size_t i = 0; i < sizeof regions / sizeof regions[0]; i++) {
        uint64_t start = (uintptr_t)regions[i].start, end = start + regions[i].size;
        if (address >= start && address + size <= end)
            return 1;
    }
    return 0;
}

kern_return_t mach_vm_read_overwrite(mach_port_t task, uint64_t address, uint64_t size,
                                     uint64_t data, uint64_t *outsize) {
    if (task != mach_task_self_)
        return MACH_SEND_INVALID_DEST;
    if (!readable(address, size))
        return KERN_INVALID_ADDRESS;
    memcpy((void *)(uintptr_t)data, (const void *)(uintptr_t)address, size);
    *outsize = size;
    return KERN_SUCCESS;
}

/* -- set-up -------------------------------------------------------------------------- */

void fake_setup(const char *own_path) {
    strncpy(dispatch_path, own_path, sizeof dispatch_path - 1);
    for (uint32_t i = 0; i < IMAGES; i++) {
        struct image *image = &images[i];
        image->header.magic = 0xFEEDFACF;
        image->header.cputype = 0x0100000C;
        image->header.filetype = i == 0 ? 2 : 6;
        image->header.ncmds = 1;
        image->header.sizeofcmds = sizeof image->text;
        image->header.flags = i == 0 ? 0 : 0x80000000u; /* MH_DYLIB_IN_CACHE */
        image->text.cmd = 0x19;
        image->text.cmdsize = sizeof image->text;
        memcpy(image->text.segname, "__TEXT", 7);
        image->text.vmaddr = 0x180000000ull + 0x100000ull * i;
        image->text.vmsize = 0x4000;
    }
}
