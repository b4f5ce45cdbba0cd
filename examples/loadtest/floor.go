package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// syncOnce is one record written in place into a file filled beforehand,
// then fdatasync: what relay-bolt's log does for a group of acks.
func syncOnce(f *os.File, rec []byte, off int64) error {
	if _, err := f.WriteAt(rec, off); err != nil {
		return err
	}
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}

// runSyncFloor measures the disk's floor under relay-bolt's acks: one
// write of a 600-byte record and one fdatasync, one at a time, paced at
// the latency scenario's rate for its duration, in a file on the file
// system holding the stores, with no server running. An ack waits for
// at least one of these, and for the rest of the one under way when it
// arrives. It runs in this process, the load generator's: the figure is
// the disk's and the kernel's, without Caddy's scheduling. A sync that
// runs past the next tick costs that tick (the rate it shows falls below
// the scenario's), as a logger that is syncing gathers what comes.
func (r *runner) runSyncFloor(ctx context.Context) error {
	progress("latency: write+fdatasync floor, %.0f/s, %s", r.opts.rate, r.opts.duration)
	r.stopServer()
	path := filepath.Join(r.base, "sync-floor")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	defer f.Close()
	// As a log segment is made: filled with zeros, so that the timed
	// syncs change no size.
	const size = 4 << 20
	if _, err := f.WriteAt(make([]byte, size), 0); err != nil {
		return fmt.Errorf("sync floor: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync floor: %w", err)
	}
	rec := make([]byte, 600)
	var h histogram
	tick := time.NewTicker(time.Duration(float64(time.Second) / r.opts.rate))
	defer tick.Stop()
	start := time.Now()
	var off int64
	for time.Since(start) < r.opts.duration {
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		rec[0]++
		t0 := time.Now()
		if err := syncOnce(f, rec, off); err != nil {
			return fmt.Errorf("sync floor: %w", err)
		}
		h.record(time.Since(t0))
		if off += int64(len(rec)); off+int64(len(rec)) > size {
			off = 0
		}
	}
	el := time.Since(start).Seconds()
	rw := naRow(fmt.Sprintf("latency %.0f/s, write+fdatasync floor", r.opts.rate), "no server")
	rw.acks = float64(h.n) / el
	rw.p50, rw.p99 = h.quantile(0.5), h.quantile(0.99)
	rw.notes = append(rw.notes, fmt.Sprintf("max %s", fmtDur(h.max)),
		fmt.Sprintf("one 600 B write in place and one fdatasync at a time on %s, from the load generator's process", fsType(r.base)))
	r.latencySyncP99 = rw.p99
	r.rows = append(r.rows, rw)
	return nil
}
