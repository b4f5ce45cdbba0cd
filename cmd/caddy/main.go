// Command caddy is Caddy with caddy-webhook-relay built in: what
// `xcaddy build --with github.com/webhook-relay/caddy-webhook-relay/caddymodule`
// produces.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// Caddy's standard modules.
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	// The relay.
	_ "github.com/webhook-relay/caddy-webhook-relay/caddymodule"
)

func main() {
	caddycmd.Main()
}
