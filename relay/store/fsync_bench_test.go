//go:build linux

package store

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// BenchmarkFdatasync measures the floor under every synced write path on
// this disk: one write and one fdatasync, with nothing else. A store
// commit costs at least this per fsync it makes (a bbolt commit makes two).
func BenchmarkFdatasync(b *testing.B) {
	// Overwriting one 4 KiB page in place: fdatasync flushes only data.
	b.Run("pwrite4KiB", func(b *testing.B) {
		// Not O_APPEND: Linux pwrite on an O_APPEND file appends.
		f := openBenchFile(b, 0)
		page := make([]byte, 4096)
		// Allocate the page first, so the timed syncs need no metadata.
		if _, err := syscall.Pwrite(int(f.Fd()), page, 0); err != nil {
			b.Fatalf("pwrite: %v", err)
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			b.Fatalf("fdatasync: %v", err)
		}
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			page[0] = byte(i)
			if _, err := syscall.Pwrite(int(f.Fd()), page, 0); err != nil {
				b.Fatalf("pwrite: %v", err)
			}
			if err := syscall.Fdatasync(int(f.Fd())); err != nil {
				b.Fatalf("fdatasync: %v", err)
			}
		}
	})
	// Appending, as a log does: each fdatasync also flushes the new size.
	b.Run("append512B", func(b *testing.B) {
		f := openBenchFile(b, os.O_APPEND)
		rec := make([]byte, 512)
		for i := 0; b.Loop(); i++ {
			rec[0] = byte(i)
			if _, err := f.Write(rec); err != nil {
				b.Fatalf("write: %v", err)
			}
			if err := syscall.Fdatasync(int(f.Fd())); err != nil {
				b.Fatalf("fdatasync: %v", err)
			}
		}
	})
}

func openBenchFile(b *testing.B, flag int) *os.File {
	b.Helper()
	f, err := os.OpenFile(filepath.Join(b.TempDir(), "sync"), os.O_CREATE|os.O_RDWR|flag, 0o600)
	if err != nil {
		b.Fatalf("opening bench file: %v", err)
	}
	b.Cleanup(func() { f.Close() })
	return f
}
