//go:build linux

package faulttest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestStorageFaults (issue 4, item 6): the store's disk full while events
// arrive, and its directory read-only at start.
func TestStorageFaults(t *testing.T) {
	needCaddy(t)
	t.Run("disk filled by another file", testDiskFullByFiller)
	t.Run("disk filled by the relay", testDiskFullByRelay)
	t.Run("read-only at start", testReadOnlyAtStart)
}

// mountTmpfs mounts a tmpfs with opts on a new temporary directory,
// unmounted when the test ends (after Caddy is stopped, since Caddy is
// started later and cleanups run last-registered first).
func mountTmpfs(t *testing.T, opts string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, opts); err != nil {
		return "", fmt.Errorf("mount -t tmpfs -o %s tmpfs %s: %w", opts, dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
			_ = syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return dir, nil
}

// fill writes path until the file system has no space left, and returns
// how much it wrote.
func fill(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 16<<10)
	var n int64
	for {
		w, err := f.Write(chunk)
		n += int64(w)
		if errors.Is(err, syscall.ENOSPC) {
			return n
		}
		if err != nil {
			t.Fatalf("filling %s: %v", path, err)
		}
	}
}

// diskFull is a relay whose store is on a small tmpfs, with its target
// down so that every event stays in the store.
type diskFull struct {
	t      *testing.T
	mnt    string
	caddy  *caddyProc
	target *target
	client *client
	l      *ledger
	ctx    context.Context
}

func newDiskFull(t *testing.T, p ports, size string) *diskFull {
	t.Helper()
	mnt, err := mountTmpfs(t, "size="+size+",mode=0700")
	if err != nil {
		t.Skipf("cannot create a disk-full condition without mounting a small tmpfs: %v", err)
	}
	legacy := newTarget(t, "legacy", modeDown)
	relay := fmt.Sprintf(`	webhook_relay diskfull {
		auth_header %s %s
		storage %s
		forward legacy %s {
			timeout 1s
			backoff 50ms 500ms
			max_attempts 100000
		}
	}`, authHeader, secret, filepath.Join(mnt, "store"), legacy.url)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return &diskFull{
		t: t, mnt: mnt, target: legacy, ctx: ctx, l: newLedger(),
		caddy:  startCaddy(t, p, caddyfile(p, t.TempDir(), relay)),
		client: newClient(t, p, 2*time.Second),
	}
}

// sendAll sends events until each is answered 200.
func (d *diskFull) sendAll(prefix string, n, pad int) {
	d.t.Helper()
	for i := range n {
		if a, ok := d.client.send(d.ctx, d.l, newEvent(fmt.Sprintf("%s-%02d", prefix, i), false, pad), nil); !ok {
			d.t.Fatalf("event %s-%02d: %v", prefix, i, a)
		}
	}
}

// refusedOnce sends ev once (again on a connection error): it returns
// true if it was stored, false if refused with a 503.
func (d *diskFull) refusedOnce(ev event) bool {
	a, ok := d.client.send(d.ctx, d.l, ev, func(_ int, a answer) bool {
		return a.err == nil && a.status == http.StatusServiceUnavailable
	})
	if !ok && a.status != http.StatusServiceUnavailable {
		d.t.Errorf("event %s with the disk full: %v", ev.id, a)
	}
	return !ok && a.status == http.StatusServiceUnavailable
}

// checkFault checks that Caddy is alive and says why it refused events.
func (d *diskFull) checkFault() {
	d.t.Helper()
	if !d.caddy.running() {
		d.t.Fatalf("caddy died with its disk full; log:\n%s", d.caddy.logTail(30))
	}
	if !strings.Contains(d.caddy.log(), "no space left on device") {
		d.t.Errorf("the 503s are not explained in caddy's log by the disk being full; log:\n%s", d.caddy.logTail(20))
	}
}

// afterFault is the end of a disk-full test, once space is freed: half the
// refused events are sent again (and must now be acked), the others never
// are, and new events are acked again. Then a kill -9 and a restart, so
// that nothing acked lives only in the engine's memory, and the target
// comes back: every event acked before, during and after the fault must be
// delivered, and none refused and never sent again.
func (d *diskFull) afterFault(refused []event) {
	t := d.t
	t.Helper()
	freed := time.Now()
	gaveUp := map[string]bool{}
	for i, ev := range refused {
		if i%2 == 1 {
			gaveUp[ev.id] = true
			continue
		}
		if a, ok := d.client.send(d.ctx, d.l, ev, nil); !ok {
			t.Fatalf("refused event %s sent again once space was freed: %v", ev.id, a)
		}
	}
	d.sendAll("disk-after", 20, 1000)
	resent := time.Since(freed)
	killed := time.Now()
	d.caddy.kill9()
	d.target.set(modeOK)
	d.caddy.restart()
	restarted := time.Now()
	rc := d.caddy.waitDrained("diskfull", 30*time.Second)
	t.Logf("space freed: %d refused events sent again and 20 new ones, all acked in %s; kill -9 and restart in %s (ready %s after the start); drained %s later",
		len(refused)-len(gaveUp), resent.Round(time.Millisecond), restarted.Sub(killed).Round(time.Millisecond),
		d.caddy.restartTook.Round(time.Millisecond), time.Since(restarted).Round(time.Millisecond))
	lost := checkAcked(t, d.target, d.l)
	unacked := checkNotUnacked(t, d.target, d.l)
	d.l.check(t)
	if rc.dead["legacy"] != 0 {
		t.Errorf("%d dead letters", rc.dead["legacy"])
	}
	for key, rc := range d.target.snapshot() {
		if gaveUp[rc.okhiID] {
			t.Errorf("event %s (%s) was refused and never sent again, yet the target got %d requests for it", rc.okhiID, key, rc.requests)
		}
	}
	f, tl := d.l.figures(), d.target.tally()
	t.Logf("caddy log: %s", d.caddy.logSummary())
	t.Logf("events acked %d (503s %d, %d refused events never sent again); after kill -9 and restart: %d delivered, %d re-deliveries; lost %d, delivered without a 200 %d",
		f.acked, f.unavailable, len(gaveUp), tl.delivered, tl.redelivered, lost, unacked)
}

// testDiskFullByFiller: another file fills the store's disk while the
// relay runs; from then on new events get 503 with Retry-After (but for a
// few that fit in pages free inside the store's file).
func testDiskFullByFiller(t *testing.T) {
	d := newDiskFull(t, freePorts(t), "4m")
	d.sendAll("disk-before", 20, 1000)
	filler := filepath.Join(d.mnt, "filler")
	filled := fill(t, filler)

	var refused []event
	var stored int
	for i := range 30 {
		ev := newEvent(fmt.Sprintf("disk-full-%03d", i), i%4 == 3, 2000)
		if d.refusedOnce(ev) {
			refused = append(refused, ev)
		} else {
			stored++
		}
	}
	d.checkFault()
	// A 200 may still come while bbolt finds free pages inside its own
	// file; what it acks must be delivered like any other (recover checks).
	t.Logf("disk filled by another file (%d KB): of 30 new events, %d refused with 503, %d stored in pages free inside the store's file",
		filled>>10, len(refused), stored)
	if len(refused) < 25 {
		t.Errorf("only %d of 30 new events refused with the disk full", len(refused))
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	d.afterFault(refused)
}

// testDiskFullByRelay: the relay itself fills its disk, with four senders
// at once (so that group commits of several events fail together, and the
// file fails to grow mid-commit). Events are answered 200 until the disk
// is full, then 503; removing a ballast file laid down at the start frees
// space again.
func testDiskFullByRelay(t *testing.T) {
	d := newDiskFull(t, freePorts(t), "3m")
	ballast := filepath.Join(d.mnt, "ballast")
	if err := os.WriteFile(ballast, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	d.sendAll("disk-before", 20, 1000)

	var (
		mu                  sync.Mutex
		refused             []event
		stored, storedAfter int
		firstRefusal        time.Time
		wg                  sync.WaitGroup
	)
	start := time.Now()
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				mu.Lock()
				done := len(refused) >= 40 || stored > 5000 || d.ctx.Err() != nil
				mu.Unlock()
				if done {
					return
				}
				ev := newEvent(fmt.Sprintf("disk-fill-%d-%04d", w, i), i%4 == 3, 2000)
				r := d.refusedOnce(ev)
				mu.Lock()
				switch {
				case r:
					if firstRefusal.IsZero() {
						firstRefusal = time.Now()
					}
					refused = append(refused, ev)
				case !firstRefusal.IsZero():
					storedAfter++
					stored++
				default:
					stored++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstRefusal.IsZero() {
		t.Fatalf("%d events of 2 KB answered 200 on a 3 MB tmpfs in %s, none refused", stored, time.Since(start).Round(time.Millisecond))
	}
	d.checkFault()
	t.Logf("disk filled by the relay: %d events stored in %s before the first 503; then %d refused, %d more stored (in pages bbolt freed inside its file)",
		stored-storedAfter, firstRefusal.Sub(start).Round(time.Millisecond), len(refused), storedAfter)
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	d.afterFault(refused)
}

// testReadOnlyAtStart: Caddy refuses to start on a store it cannot write,
// with an error that names the store's path.
func testReadOnlyAtStart(t *testing.T) {
	var storeDir, how string
	mnt, err := mountTmpfs(t, "size=1m,mode=0700")
	switch {
	case err == nil:
		storeDir = filepath.Join(mnt, "store")
		if err := os.Mkdir(storeDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount("tmpfs", mnt, "tmpfs", syscall.MS_REMOUNT|syscall.MS_RDONLY, "size=1m"); err != nil {
			t.Fatalf("remounting read-only: %v", err)
		}
		how = "a read-only tmpfs"
	case os.Geteuid() != 0:
		// Without mounts, permissions do it (root would ignore them).
		storeDir = filepath.Join(t.TempDir(), "store")
		if err := os.Mkdir(storeDir, 0o500); err != nil {
			t.Fatal(err)
		}
		how = "a directory without write permission"
	default:
		t.Skipf("root ignores permissions and cannot mount here (%v): no way to make the store unwritable", err)
	}
	p := freePorts(t)
	legacy := newTarget(t, "legacy", modeOK)
	relay := fmt.Sprintf(`	webhook_relay readonly {
		auth_header %s %s
		storage %s
		forward legacy %s
	}`, authHeader, secret, storeDir, legacy.url)
	caddy := launchCaddy(t, p, caddyfile(p, t.TempDir(), relay))
	caddy.waitExit(20 * time.Second)
	code := exitCode(caddy.waitErr)
	log := caddy.log()
	if code == 0 {
		t.Errorf("caddy exited 0 on a store it cannot write")
	}
	if !strings.Contains(log, filepath.Join(storeDir, "relay.db")) && !strings.Contains(log, storeDir) {
		t.Errorf("caddy's error does not name the store's path %s; log:\n%s", storeDir, caddy.logTail(10))
	}
	var line string
	for l := range strings.SplitSeq(log, "\n") {
		if strings.Contains(l, storeDir) {
			line = l
		}
	}
	t.Logf("store on %s: caddy exited with code %d: %s", how, code, line)
}
