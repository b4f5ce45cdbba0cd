//go:build !unix

package relay

import "time"

// processCPU is 0 where the relay does not read it: no burst holds.
func processCPU() time.Duration { return 0 }
