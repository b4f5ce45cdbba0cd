package store

// Listing limits of the stores of one process (ListPending): a page
// is bounded so that one admin request cannot copy a million deliveries.
const (
	defaultListLimit = 100
	maxListLimit     = 1000
)

// listLimit turns a caller's limit into the page size used.
func listLimit(limit int) int {
	switch {
	case limit <= 0:
		return defaultListLimit
	case limit > maxListLimit:
		return maxListLimit
	}
	return limit
}
