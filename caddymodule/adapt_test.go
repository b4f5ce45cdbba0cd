package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

var update = flag.Bool("update", false, "rewrite the JSON half of testdata/*.caddyfiletest from the adapter's output")

// TestCaddyfileAdapt adapts each testdata/*.caddyfiletest (a Caddyfile, a
// line of dashes, the JSON it must adapt to), the way Caddy's own
// integration tests do.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/*.caddyfiletest")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/*.caddyfiletest files")
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, expected, found := strings.Cut(string(data), "----------")
			if !found && !*update {
				t.Fatalf("%s has no ---------- line between the Caddyfile and the JSON", file)
			}
			caddyfile = strings.TrimSpace(caddyfile) + "\n"
			expected = strings.TrimSpace(expected)
			if *update {
				rewriteGolden(t, file, caddyfile)
				return
			}
			if !caddytest.CompareAdapt(t, file, caddyfile, "caddyfile", expected) {
				t.Errorf("adapting %s: output differs from the expected JSON (diff above)", file)
			}
		})
	}
}

func rewriteGolden(t *testing.T, file, caddyfile string) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting %s: %v", file, err)
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte(caddyfile+"----------\n"+pretty.String()+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}
