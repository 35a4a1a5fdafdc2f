;; counter: the demo app, in WebAssembly text. Its only state is two mutable globals that
;; the module does not export: the host reaches them by rewriting the module at load time.
;;
;; Each message on .../in adds one to the count and folds the payload into a running hash;
;; the app then publishes "<count> <hash>" on out/count. On a tick it publishes the count
;; on out/tick. Run it: mesh run mesh/apps/counter.wat --in a --in b
(module
  (import "mesh" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (import "mesh" "log" (func $log (param i32 i32 i32)))

  (memory (export "memory") 2)
  (global $count (mut i64) (i64.const 0))
  (global $hash (mut i64) (i64.const 5381))

  (data (i32.const 16) "count")
  (data (i32.const 32) "tick")
  (data (i32.const 48) "counter ready")

  ;; Messages are written into the second page: one message at a time, up to 64 KiB.
  (func (export "mesh_alloc") (param $size i32) (result i32)
    (if (i32.gt_u (local.get $size) (i32.const 65536))
      (then (return (i32.const 0))))
    (i32.const 65536))

  (func (export "mesh_init")
    (call $log (i32.const 1) (i32.const 48) (i32.const 13)))

  ;; Writes $value in decimal so that it ends just before $end; returns where it starts.
  (func $decimal (param $value i64) (param $end i32) (result i32)
    (loop $digits
      (local.set $end (i32.sub (local.get $end) (i32.const 1)))
      (i64.store8 (local.get $end)
        (i64.add (i64.const 48) (i64.rem_u (local.get $value) (i64.const 10))))
      (local.set $value (i64.div_u (local.get $value) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $value) (i64.const 0))))
    (local.get $end))

  (func (export "mesh_on_message") (param $topic i32) (param $topic_len i32)
                                   (param $payload i32) (param $len i32)
    (local $i i32)
    (local $start i32)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (block $done
      (loop $bytes
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (global.set $hash
          (i64.add (i64.mul (global.get $hash) (i64.const 33))
                   (i64.load8_u (i32.add (local.get $payload) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $bytes)))
    ;; "<count> <hash>" built backwards from offset 1024
    (local.set $start (call $decimal (global.get $hash) (i32.const 1024)))
    (local.set $start (i32.sub (local.get $start) (i32.const 1)))
    (i32.store8 (local.get $start) (i32.const 32))
    (local.set $start (call $decimal (global.get $count) (local.get $start)))
    (drop (call $publish (i32.const 16) (i32.const 5)
                         (local.get $start) (i32.sub (i32.const 1024) (local.get $start)))))

  (func (export "mesh_on_tick") (param $now i64)
    (local $start i32)
    (local.set $start (call $decimal (global.get $count) (i32.const 1024)))
    (drop (call $publish (i32.const 32) (i32.const 4)
                         (local.get $start) (i32.sub (i32.const 1024) (local.get $start))))))
