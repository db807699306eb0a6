//go:build !ts_debug_websockets

package main

const websocketCompiled = false
