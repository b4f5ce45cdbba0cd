package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// machine describes where the run happened, for the report.
func machine() []string {
	var out []string
	nproc := strings.TrimSpace(cmdOutput("nproc"))
	if nproc == "" {
		nproc = strconv.Itoa(runtime.NumCPU())
	}
	out = append(out, "cpus: "+nproc+" (nproc), model: "+cpuModel())
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		out = append(out, "kernel: "+strings.TrimSpace(string(b)))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		out = append(out, "memory: "+strings.Join(strings.Fields(line)[1:], " "))
	}
	goVer := strings.TrimSpace(cmdOutput("go", "version"))
	out = append(out, "go: "+goVer+" (load generator built with "+runtime.Version()+")")
	return out
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func cmdOutput(name string, args ...string) string {
	b, err := exec.Command(name, args...).Output()
	if err != nil {
		return ""
	}
	return string(b)
}

// pinSelf moves every thread of this process to cpu (threads made later
// inherit it) and sizes the Go scheduler to match.
func pinSelf(cpu int) error {
	out, err := exec.Command("taskset", "-a", "-pc", strconv.Itoa(cpu), strconv.Itoa(os.Getpid())).CombinedOutput()
	if err != nil {
		return fmt.Errorf("taskset -a -pc %d: %v: %s", cpu, err, bytes.TrimSpace(out))
	}
	runtime.GOMAXPROCS(1)
	return nil
}

// fsType names the file system holding path: fsync costs nothing on tmpfs.
func fsType(path string) string {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return "unknown"
	}
	switch uint64(st.Type) {
	case 0x01021994:
		return "tmpfs"
	case 0xEF53:
		return "ext4"
	case 0x58465342:
		return "xfs"
	case 0x9123683E:
		return "btrfs"
	case 0x794c7630:
		return "overlayfs"
	case 0x2fc12fc1:
		return "zfs"
	}
	return fmt.Sprintf("0x%x", uint64(st.Type))
}

var clkTck = sync.OnceValue(func() float64 {
	if n, err := strconv.Atoi(strings.TrimSpace(cmdOutput("getconf", "CLK_TCK"))); err == nil && n > 0 {
		return float64(n)
	}
	return 100
})

// procCPU is the on-CPU time (user+system) of process pid so far.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After the command name: state is field 3, utime 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return time.Duration(float64(ut+st) / clkTck() * float64(time.Second)), nil
}

// procStatusKB reads a "kB" field (VmHWM, VmRSS) of /proc/<pid>/status.
func procStatusKB(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}

// selfCPU is this process's user+system time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// coreTimes are the busy, total, stolen and interrupt jiffies of each
// core from /proc/stat; busy leaves out idle, iowait and steal.
type coreTimes [][4]uint64

func readCores() coreTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil
	}
	var out coreTimes
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		var total, idle, steal, irq uint64
		for i, s := range f[1:] {
			if i >= 8 { // guest time is already in user
				break
			}
			n, _ := strconv.ParseUint(s, 10, 64)
			total += n
			switch i {
			case 3, 4: // idle, iowait
				idle += n
			case 5, 6: // irq, softirq: loopback TCP is mostly softirq
				irq += n
			case 7:
				steal = n
			}
		}
		out = append(out, [4]uint64{total - idle - steal, total, steal, irq})
	}
	return out
}

// coreLoad is how busy each core was between two readings, how much of
// that was interrupts, and how much the hypervisor took (steal), in % of
// that core.
type coreLoad struct{ busy, steal, irq float64 }

func coreBusy(a, b coreTimes) []coreLoad {
	if len(a) != len(b) {
		return nil
	}
	out := make([]coreLoad, len(a))
	for i := range a {
		dt := b[i][1] - a[i][1]
		if dt > 0 {
			out[i] = coreLoad{
				busy:  100 * float64(b[i][0]-a[i][0]) / float64(dt),
				steal: 100 * float64(b[i][2]-a[i][2]) / float64(dt),
				irq:   100 * float64(b[i][3]-a[i][3]) / float64(dt),
			}
		}
	}
	return out
}

// dirSize is the total size of the regular files under dir.
func dirSize(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}
