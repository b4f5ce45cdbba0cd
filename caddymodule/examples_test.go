package caddymodule

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// TestExampleCaddyfilesAdapt keeps the demo and the examples loadable:
// each adapts without error or warning and holds a webhook_relay.
func TestExampleCaddyfilesAdapt(t *testing.T) {
	// From the repository's root, as the README runs them: the files an
	// example names (a jq_file) are relative to Caddy's working directory.
	t.Chdir("..")
	files, err := filepath.Glob("examples/*/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	// Set-ups of several instances, one Caddyfile each (cluster/Caddyfile.a).
	more, err := filepath.Glob("examples/*/Caddyfile.*")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, more...)
	files = append(files, "Caddyfile")
	if len(files) < 3 {
		t.Fatalf("found only %v", files)
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			body, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": f})
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("warning: %s:%d: %s", w.File, w.Line, w.Message)
			}
			if !bytes.Contains(out, []byte(`"handler":"webhook_relay"`)) {
				t.Errorf("no webhook_relay handler in %s", out)
			}
		})
	}
}
