import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// `shard_optimizer`: each data-parallel rank keeps the Adam state of its share of the tensors. AdamW is
/// element-wise, so who runs a tensor's update cannot change its bits: sharded runs must give the same
/// losses and the same checkpoint bytes as unsharded ones at the same number of ranks, and resume across
/// sharding and world sizes like them.
final class ShardedOptimizerTests: XCTestCase {
    /// `DataParallelTests.recipe` (ReLoRA over q4_0, restart after step 3 with the paper's magnitude reset,
    /// dropout, 8-bit moments for the tensors of 4096 entries or more, f32 for the others; 6 micro-batches
    /// a step, a checkpoint every 2 steps, all kept) with `shard_optimizer` as given.
    static func recipe(_ d: TrainerTests.ByteData, run: String, sharded: Bool, steps: Int = 6, reloraEvery: Int = 3,
                       _ edit: (inout Recipe) -> Void = { _ in }) -> Recipe {
        var r = DataParallelTests.recipe(d, run: run, steps: steps, reloraEvery: reloraEvery)
        r.shardOptimizer = sharded
        r.keepCheckpoints = 3
        edit(&r)
        return r
    }

    struct Outcome {
        var losses: [Double]
        /// Every rank's final weights hash.
        var hashes: [UInt64]
        /// Every rank's fractions of LoRA moments zeroed at the last restart.
        var resets: [[Double]]
        /// Rank 0's log.
        var log: [String]
    }

    static func train(_ recipe: Recipe, ranks: Int, resume: Bool = false) throws -> Outcome {
        let lines = LockedLines()
        let out = try InProcessGroup.run(ranks: ranks) { c -> ([Double], UInt64, [Double]) in
            let t = try Trainer(recipe: recipe, resume: resume, backend: CPUBackend(), communicator: c, log: { lines.append($0) })
            _ = try t.run()
            return (t.history.map(\.loss), t.weightsHash(), t.lastResetFractions.map { [$0.m, $0.v] } ?? [])
        }
        return Outcome(losses: out[0].0, hashes: out.map(\.1), resets: out.map(\.2), log: lines.lines)
    }

    /// The bytes of the tensor files of checkpoint `step` of a run (the recipe.json and state.json beside
    /// them name the run's own directory and recipe).
    static func checkpointTensors(_ runDir: String, step: Int) -> [Data?] {
        let dir = runDir + "/checkpoints/" + TrainingCheckpoint.name(step: step)
        return ["model.tensors.zst", "lora.tensors.zst", "optimizer.tensors.zst"].map { FileManager.default.contents(atPath: dir + "/" + $0) }
    }

    // MARK: The assignment

    func testShardsAreWholeTensorsBalancedByBytesAndAPureFunction() throws {
        // Largest first, each to the rank with the fewest bytes: 1 and 5 (50), 2 and 3 (20), 0 (10), 4 (5).
        let s = OptimizerShards(costs: [10, 50, 20, 20, 5, 50], worldSize: 2)
        XCTAssertEqual(s.owner, [0, 0, 0, 1, 1, 1])
        XCTAssertEqual(s.bytes, [80, 75])
        XCTAssertEqual(s.tensors(of: 1), [3, 4, 5])
        XCTAssertEqual(s, OptimizerShards(costs: [10, 50, 20, 20, 5, 50], worldSize: 2))
        XCTAssertEqual(OptimizerShards(costs: [3, 1, 2], worldSize: 1).owner, [0, 0, 0])
        XCTAssertEqual(OptimizerShards(costs: [3, 1], worldSize: 4).bytes, [3, 1, 0, 0], "more ranks than tensors: some hold none")

        // The trained tensors of a ReLoRA model with 8-bit moments: every tensor on one rank, and no rank over
        // an even share by more than the largest tensor (greedy's bound: the last tensor placed on the fullest
        // rank went to the emptiest one, which held at most the average).
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let recipe = Self.recipe(d, run: "assign", sharded: true)
        let backend = PlanningBackend(target: .cuda)
        let (_, optimizer) = TrainingModel.build(recipe, config: try LlamaConfig(contentsOf: d.model), backend: backend, rank: 1, worldSize: 3)
        let shards = try XCTUnwrap(optimizer.shards)
        let costs = optimizer.parameters.map {
            AdamW.stateBytes(count: $0.value.count, dtype: $0.value.dtype, precision: backend.precision, states: .int8)
        }
        XCTAssertEqual(shards, OptimizerShards(costs: costs, worldSize: 3))
        XCTAssertEqual(shards.bytes.reduce(0, +), costs.reduce(0, +))
        XCTAssertLessThanOrEqual(shards.bytes.max()!, costs.reduce(0, +) / 3 + costs.max()!)
        XCTAssertEqual(optimizer.parameters.indices.filter(optimizer.owns), shards.tensors(of: 1))
        // Rank 1 allocated its own tensors' state only: moments, and masters of its bf16 working copies on cuda.
        for i in optimizer.parameters.indices {
            XCTAssertEqual(optimizer.m[i] != nil, shards.owner[i] == 1)
            XCTAssertEqual(optimizer.parameters[i].master != nil, shards.owner[i] == 1)
        }
        XCTAssertEqual(backend.ledger.report().peak(.optimizer) + backend.ledger.report().peak(.masterWeights), shards.bytes[1])
    }

    /// The updated working copies reach every rank whatever the chunk size cuts: tensors split over rounds,
    /// a round holding the ends and starts of several, ranks whose streams end rounds before the longest.
    /// Each owner holds values that encode (tensor, position); the other ranks hold garbage until shared.
    func testUpdatedValuesReachEveryRankForAnyChunkSize() throws {
        let shapes = [[5, 3], [17], [2, 2], [40], [1], [9, 9], [3]]
        let shards = OptimizerShards(costs: shapes.map { 8 * $0.reduce(1, *) }, worldSize: 3)
        XCTAssertEqual(Set(shards.owner), [0, 1, 2])
        func value(_ i: Int, _ j: Int) -> Float { Float(i * 1000 + j) + 0.25 }
        for chunk in [1, 3, 7, 64, 1 << 24] {
            let ranks = try InProcessGroup.run(ranks: 3) { c -> [[Float]] in
                let backend = CPUBackend()
                let params = shapes.enumerated().map { i, shape in
                    let n = shape.reduce(1, *)
                    let mine = shards.owner[i] == c.rank
                    return TrainableParameter(name: "p\(i)", value: makeTensor(backend, shape, (0..<n).map { mine ? value(i, $0) : -1 - Float(c.rank) }),
                                              grad: makeTensor(backend, shape, [Float](repeating: 0, count: n)), isLoRA: false)
                }
                let opt = AdamW(parameters: params, backend: backend, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0,
                                shards: shards, rank: c.rank)
                try Trainer.shareUpdatedValues(opt, c, valueChunk: chunk)
                return params.map { backend.download($0.value) }
            }
            for (rank, values) in ranks.enumerated() {
                for (i, shape) in shapes.enumerated() {
                    XCTAssertEqual(values[i], (0..<shape.reduce(1, *)).map { value(i, $0) }, "chunk \(chunk), rank \(rank), tensor \(i)")
                }
            }
        }
    }

    // MARK: Training

    /// W = 2 and 3 sharded ranks against unsharded ones: the same loss bits every step, the same weights on
    /// every rank, the same reset fractions after the restart (each rank pruned its own tensors; the counts
    /// are summed) and the same bytes in every checkpoint's tensor files. ReLoRA with a magnitude reset and
    /// 8-bit moments; and LoRA with f32 moments, no clipping, at W = 2.
    func testShardedRanksTrainBitIdenticallyToUnsharded() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        var cases: [(String, Int, (inout Recipe) -> Void)] = [("relora", 2, { _ in }), ("relora", 3, { _ in })]
        cases.append(("lora", 2, { $0.mode = .lora; $0.reloraEvery = nil; $0.optimizerStates = .f32; $0.gradClip = 0 }))
        for (name, w, edit) in cases {
            let label = "\(name) W \(w)"
            let plain = try Self.train(Self.recipe(d, run: "\(name)-\(w)-plain", sharded: false, edit), ranks: w)
            let sharded = try Self.train(Self.recipe(d, run: "\(name)-\(w)-sharded", sharded: true, edit), ranks: w)
            XCTAssertEqual(sharded.losses.count, 6, label)
            XCTAssertEqual(sharded.losses.map(\.bitPattern), plain.losses.map(\.bitPattern), "\(label): \(sharded.losses) vs \(plain.losses)")
            XCTAssertEqual(Set(sharded.hashes).count, 1, label)
            XCTAssertEqual(sharded.hashes, plain.hashes, label)
            XCTAssertEqual(sharded.resets, plain.resets, label)
            if name == "relora" {
                XCTAssertGreaterThan(sharded.resets[0][0], 0.9, "\(label): the magnitude reset zeroed 0.99 of the LoRA moments")
            }
            for step in [2, 4, 6] {
                let files = Self.checkpointTensors(d.dir + "/\(name)-\(w)-sharded", step: step)
                XCTAssertTrue(files.allSatisfy { $0 != nil }, "\(label): step \(step)")
                XCTAssertEqual(files, Self.checkpointTensors(d.dir + "/\(name)-\(w)-plain", step: step), "\(label): step \(step)")
            }
            // One line at the start names each rank's share.
            let line = try XCTUnwrap(sharded.log.first { $0.hasPrefix("optimizer states sharded over \(w) ranks: rank 0 holds ") }, "\(sharded.log)")
            XCTAssertEqual(line.components(separatedBy: " tensors (").count - 1, w, line)
            XCTAssertFalse(plain.log.contains { $0.contains("sharded") }, label)
        }
    }

    /// A sharded checkpoint is the unsharded one: 2 sharded ranks continue as 1 unsharded process, and 1
    /// process as 3 sharded ranks, across a restart, with the same loss bits and checkpoint bytes as the
    /// same world sizes without sharding; the first step after the resume has the loss bits the straight
    /// run had at that step.
    func testShardedCheckpointsResumeAtAnyWorldSizeWithOrWithoutSharding() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let straight = try Self.train(Self.recipe(d, run: "straight", sharded: true, steps: 4, reloraEvery: 2), ranks: 2)
        for (first, firstSharded, then, thenSharded) in [(2, true, 1, false), (1, false, 3, true)] {
            var runs: [Outcome] = []
            for reference in [false, true] {
                let run = "resume-\(first)-\(then)" + (reference ? "-plain" : "")
                _ = try Self.train(Self.recipe(d, run: run, sharded: firstSharded && !reference, steps: 2, reloraEvery: 2), ranks: first)
                runs.append(try Self.train(Self.recipe(d, run: run, sharded: thenSharded && !reference, steps: 4, reloraEvery: 2),
                                           ranks: then, resume: true))
                XCTAssertTrue(runs.last!.log.contains { $0.hasPrefix("resumed from ") })
            }
            let label = "\(first) -> \(then)"
            XCTAssertEqual(runs[0].losses.count, 2, label)
            XCTAssertEqual(runs[0].losses.map(\.bitPattern), runs[1].losses.map(\.bitPattern), label)
            XCTAssertEqual(runs[0].hashes, runs[1].hashes, label)
            XCTAssertEqual(Self.checkpointTensors(d.dir + "/resume-\(first)-\(then)", step: 4),
                           Self.checkpointTensors(d.dir + "/resume-\(first)-\(then)-plain", step: 4), label)
            if first == 2 { XCTAssertEqual(runs[0].losses[0].bitPattern, straight.losses[2].bitPattern, label) }
        }
    }

    /// A warm start from a full-rank checkpoint loads the dense tensors' moments: with a sharded optimizer
    /// each rank loads its own, and the run is the unsharded one, bit for bit.
    func testWarmStartLoadsEachRanksOwnMoments() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let full = Self.recipe(d, run: "warm-source", sharded: false, steps: 2) {
            $0.mode = .full; $0.reloraEvery = nil; $0.quant = .none; $0.optimizerStates = .f32
        }
        _ = try Self.train(full, ranks: 1)
        var runs: [Outcome] = []
        for sharded in [false, true] {
            runs.append(try Self.train(Self.recipe(d, run: "warm-\(sharded)", sharded: sharded) { $0.warmStart = full.runDir }, ranks: 2))
            XCTAssertTrue(runs.last!.log.contains { $0.hasPrefix("warm start from ") }, "\(runs.last!.log)")
        }
        XCTAssertEqual(runs[1].losses.count, 4)
        XCTAssertEqual(runs[1].losses.map(\.bitPattern), runs[0].losses.map(\.bitPattern))
        XCTAssertEqual(runs[1].hashes, runs[0].hashes)
        XCTAssertEqual(Self.checkpointTensors(d.dir + "/warm-true", step: 6), Self.checkpointTensors(d.dir + "/warm-false", step: 6))
    }

    /// With one process the option is accepted and changes nothing but a note.
    func testOneProcessIgnoresTheOptionWithANote() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let plain = try Self.train(Self.recipe(d, run: "one-plain", sharded: false, steps: 2, reloraEvery: 2), ranks: 1)
        let asked = try Self.train(Self.recipe(d, run: "one-asked", sharded: true, steps: 2, reloraEvery: 2), ranks: 1)
        XCTAssertEqual(asked.losses.map(\.bitPattern), plain.losses.map(\.bitPattern))
        XCTAssertTrue(asked.log.contains { $0.hasPrefix("note: shard_optimizer has no effect in a run of one process") }, "\(asked.log)")
        // The option is kept in the run's recipe (a resume under a launcher shards again), and only when set.
        let saved = try String(contentsOfFile: d.dir + "/one-asked/recipe.json", encoding: .utf8)
        XCTAssertTrue(saved.contains("\"shard_optimizer\" : true") || saved.contains("\"shard_optimizer\":true"), saved)
        XCTAssertFalse(try String(contentsOfFile: d.dir + "/one-plain/recipe.json", encoding: .utf8).contains("shard_optimizer"))
    }
}

/// Log lines from several ranks' threads (only rank 0 logs, but the closure is shared).
final class LockedLines: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: [String] = []
    func append(_ line: String) { lock.lock(); stored.append(line); lock.unlock() }
    var lines: [String] { lock.lock(); defer { lock.unlock() }; return stored }
}
