import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRAAnalysis
import ReLoRASelfTest

/// A tiny `--key value` / `--flag` parser: no package dependencies, errors are `ReLoRAError.usage`.
struct Arguments {
    private var values: [String: String] = [:]
    private var flags: Set<String> = []
    private(set) var positional: [String] = []
    private var consumed: Set<String> = []

    /// `flagNames` are options that take no value (e.g. "json").
    init(_ args: [String], flagNames: Set<String>) throws {
        var i = 0
        while i < args.count {
            let a = args[i]
            if a.hasPrefix("--") {
                var key = String(a.dropFirst(2))
                if let eq = key.firstIndex(of: "=") {
                    values[String(key[..<eq])] = String(key[key.index(after: eq)...])
                    key = String(key[..<eq])
                } else if flagNames.contains(key) {
                    flags.insert(key)
                } else {
                    guard i + 1 < args.count else { throw ReLoRAError.usage("option --\(key) needs a value") }
                    values[key] = args[i + 1]
                    i += 1
                }
            } else {
                positional.append(a)
            }
            i += 1
        }
    }

    func flag(_ name: String) -> Bool { flags.contains(name) }

    func string(_ name: String) -> String? { values[name] }

    func required(_ name: String) throws -> String {
        guard let v = values[name] else { throw ReLoRAError.usage("missing required option --\(name)") }
        return v
    }

    func int(_ name: String, default def: Int? = nil) throws -> Int {
        guard let raw = values[name] else {
            if let def { return def }
            throw ReLoRAError.usage("missing required option --\(name)")
        }
        guard let v = Int(raw) else { throw ReLoRAError.usage("--\(name) must be an integer, got '\(raw)'") }
        return v
    }

    /// The backend of `--device cpu|cuda` (default cpu), from the one factory.
    func backend() throws -> Backend {
        try BackendFactory.make(Device(parsing: string("device") ?? "cpu"))
    }

    /// Rejects options the command does not know (typos should not be silently ignored).
    func checkKnown(_ known: Set<String>) throws {
        for key in Set(values.keys).union(flags) where !known.contains(key) {
            throw ReLoRAError.usage("unknown option --\(key); see --help")
        }
    }
}

/// Writes a line to stdout unbuffered (progress must show up even when stdout is a pipe).
func printLine(_ s: String) {
    FileHandle.standardOutput.write(Data((s + "\n").utf8))
}
