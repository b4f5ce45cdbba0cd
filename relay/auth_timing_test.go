package relay

import (
	"flag"
	"net/http"
	"strings"
	"testing"
)

// TestAuthCheckTiming measures how long Check takes to reject a wrong
// secret that differs from the right one at its first byte, at its last
// byte, or in length, and logs the ratios (run with -v to see them). It
// never asserts on them: timings on a shared CI machine are noise, and
// BenchmarkAuthCheck is where to compare them with care. What makes the
// compare constant-time is that Check hashes the value sent and compares
// digests with subtle.ConstantTimeCompare; this test shows the figures.
func TestAuthCheckTiming(t *testing.T) {
	if testing.Short() {
		t.Skip("timing measurement skipped in -short mode")
	}
	// testing.Benchmark runs each function for -test.benchtime (1s by
	// default); a fixed count keeps this test short. The flag is put back
	// for any benchmark run after the tests.
	if bt := flag.Lookup("test.benchtime"); bt != nil {
		prev := bt.Value.String()
		if err := bt.Value.Set("10000x"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = bt.Value.Set(prev) })
	}

	secret := strings.Repeat("k", 31) + "z"
	a, err := NewAuthenticator("X-Auth", []string{secret, "rotated-" + secret})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		value string
	}{
		{"right", secret},
		{"first byte wrong", "Q" + secret[1:]},
		{"last byte wrong", secret[:len(secret)-1] + "Q"},
		{"shorter", secret[:len(secret)/2]},
		{"longer", secret + "k"},
		{"empty", ""},
	}
	// Rounds interleave the cases, and each case keeps its best round:
	// the one least disturbed by the scheduler and other packages' tests.
	ns := map[string]float64{}
	for range 5 {
		for _, c := range cases {
			h := http.Header{"X-Auth": {c.value}}
			want := c.value == secret
			r := testing.Benchmark(func(b *testing.B) {
				for b.Loop() {
					if a.Check(h) != want {
						b.Fatal("wrong verdict")
					}
				}
			})
			if r.N == 0 {
				t.Fatalf("%s: the benchmark did not run", c.name)
			}
			v := float64(r.T.Nanoseconds()) / float64(r.N)
			if best, ok := ns[c.name]; !ok || v < best {
				ns[c.name] = v
			}
		}
	}
	for _, c := range cases {
		t.Logf("%-16s %6.0f ns/op", c.name, ns[c.name])
	}
	base := ns["first byte wrong"]
	for _, c := range cases[1:] {
		t.Logf("%-16s / first byte wrong = %.3f", c.name, ns[c.name]/base)
	}
}
