//! Prints the symbols of a kernel file (ELF symbol table, kallsyms in a
//! stripped image, or System.map) in /proc/kallsyms format.
fn main() {
    let path = std::env::args().nth(1).expect("usage: ksyms FILE");
    let t0 = std::time::Instant::now();
    let table = symbol_db::SymbolTable::from_file(path.as_ref()).unwrap_or_else(|e| {
        eprintln!("ksyms: {e}");
        std::process::exit(1)
    });
    eprintln!("{} symbols in {:?}", table.len(), t0.elapsed());
    for s in table.iter() {
        println!("{:016x} {} {}", s.addr, s.ty, s.name);
    }
}
